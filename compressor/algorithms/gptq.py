"""GPTQ (Frantar et al., 2022): quantize columns one at a time, pushing each column's
rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the
layer's inputs.

Choices made here:
- ``act_order``: columns are visited in order of decreasing Hessian diagonal. Groups stay
  contiguous in the original column order and their scales are computed up front from the
  unmodified weight ("static groups"), so the checkpoint needs no group index and every
  kernel can run it.
- Without ``act_order`` a group's scale is computed when its first column is reached, from
  the error-updated weights (the paper's procedure).
- Dead input columns (zero Hessian diagonal) are zeroed and given a unit diagonal.
- Dampening starts at ``dampening × mean(diag H)``; if the Cholesky factorization fails the
  damping grows tenfold up to four times, and only then the layer falls back to RTN (the
  result says so).
- ``keep_mask`` (a pruned layer): weights outside the mask are forced to the grid's exact zero
  after each column's update, and what they held at that moment is pushed onto the columns not
  yet quantized like any rounding error, so the sparsity pattern survives quantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.algorithms.grid import (
    WeightGrid,
    dequantize_codes,
    group_scale_zero,
    quantize_codes,
    weight_scale_zero,
)
from compressor.algorithms.rtn import rtn_quantize

_DAMPING_RETRIES = 4
# Columns whose rank-1 updates are applied one by one inside a lazy-update block; the rest of
# the block gets them as one matmul. Exact in real arithmetic. It shortens the memory-bound
# per-column updates, which only pays on a loaded CPU (benchmarks/gptq_stage_profile.py).
_INNER_BLOCK = 32


@dataclass
class GPTQResult:
    codes: torch.Tensor  # [out, in] int8
    scale: torch.Tensor  # [out, groups] float32
    zero: torch.Tensor | None  # [out, groups] float32 or None
    error: float  # the GPTQ objective: sum of (w - q)^2 / d^2 over all weights, halved
    damping: float  # the relative damping that was finally used
    fallback: str | None = None  # why the layer was quantized with RTN instead


def _inverse_hessian_factor(hessian: torch.Tensor, dampening: float) -> tuple[torch.Tensor | None, float]:
    """Upper Cholesky factor of H⁻¹ (with damping), and the damping used."""
    mean_diag = torch.mean(torch.diag(hessian)).item()
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    damping = dampening
    for _ in range(_DAMPING_RETRIES + 1):
        damped = hessian + eye * (damping * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info.item() == 0 and torch.isfinite(upper).all():
                return upper, damping
        damping *= 10
    return None, damping


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: WeightGrid,
    *,
    block_size: int = 128,
    dampening: float = 0.01,
    act_order: bool = True,
    keep_mask: torch.Tensor | None = None,
) -> GPTQResult:
    """GPTQ on one weight matrix [out, in] given the Hessian [in, in] of its inputs;
    `keep_mask` [out, in] (bool) marks the weights a pruned layer keeps."""
    w = weight.float().clone()
    if keep_mask is not None:
        w[~keep_mask] = 0.0
    h = hessian.float().clone()
    out_features, in_features = w.shape
    per_group = grid.columns_per_group(in_features)

    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    static = act_order or grid.group_size is None
    if static:
        scale, zero = weight_scale_zero(w, grid)
    else:
        groups = in_features // per_group
        scale = torch.zeros(out_features, groups)
        zero = None if grid.symmetric else torch.zeros(out_features, groups)

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(in_features)
    h = h[perm][:, perm]
    group_of = (perm // per_group).tolist()

    hinv, damping = _inverse_hessian_factor(h, dampening)
    if hinv is None:
        codes, scale, zero = rtn_quantize(w.to(weight.dtype) if keep_mask is not None else weight, grid)
        return GPTQResult(codes, scale, zero, float("nan"), damping, "Hessian not positive definite")

    # Work on the transpose so that each input column is one contiguous row.
    wt = w.t()[perm].contiguous()  # [in, out], in visiting order
    pruned_t = (~keep_mask).t()[perm].contiguous() if keep_mask is not None else None
    codes_t = torch.zeros_like(wt)
    scale_t = scale.t().contiguous()  # [groups, out]
    zero_t = zero.t().contiguous() if zero is not None else None
    total_error = 0.0
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        width = end - start
        block = wt[start:end].clone()
        errors = torch.empty_like(block)
        hinv_block = hinv[start:end, start:end]
        flushed, limit = 0, 0
        for i in range(width):
            column = start + i
            group = group_of[column]
            new_group = not static and column % per_group == 0
            if i == limit:
                # Push the errors of columns [flushed, i) onto the rest of the block in one
                # matmul; rank-1 updates below only reach columns before `limit`. Same sums
                # as updating every later column of the block per column, far fewer passes.
                # Without static groups `limit` never passes a group start, so a group's range
                # is read with every earlier error applied.
                if i > flushed:
                    block[i:].addmm_(hinv_block[flushed:i, i:].t(), errors[flushed:i], alpha=-1.0)
                flushed = i
                limit = min(i + _INNER_BLOCK, width)
                if not static:
                    limit = min(limit, i + per_group - column % per_group)
            if new_group:
                # The group's columns past this block have not yet received this block's
                # pending (lazy) updates; apply them before measuring the group's range.
                stop = min(column + per_group, in_features)
                pending = wt[end:stop] - hinv[start : start + i, end:stop].t() @ errors[:i] if stop > end else wt[end:end]
                upcoming = torch.cat([block[i : i + per_group], pending], dim=0)
                s, z = group_scale_zero(upcoming.t(), grid)
                scale_t[group] = s[:, 0]
                if zero_t is not None and z is not None:
                    zero_t[group] = z[:, 0]
            col_zero = zero_t[group] if zero_t is not None else None
            current = block[i]
            q = quantize_codes(current, scale_t[group], col_zero, grid)
            if pruned_t is not None:
                zero_code = col_zero if col_zero is not None else torch.zeros_like(q)
                q = torch.where(pruned_t[column], zero_code, q)
            codes_t[column] = q
            err = (current - dequantize_codes(q, scale_t[group], col_zero)) / hinv_block[i, i]
            errors[i] = err
            block[i:limit].addr_(hinv_block[i, i:limit], err, alpha=-1.0)
        total_error += float(errors.pow(2).sum()) / 2
        wt[end:].addmm_(hinv[start:end, end:].t(), errors, alpha=-1.0)

    codes = codes_t[torch.argsort(perm)].t()
    scale = scale_t.t().contiguous()
    zero = zero_t.t().contiguous() if zero_t is not None else None
    return GPTQResult(codes.to(torch.int8).contiguous(), scale, zero, total_error, damping)


# Width of the row panels in which `gram` builds xᵀx (see there).
_GRAM_PANEL = 256


def gram(x: torch.Tensor) -> torch.Tensor:
    """xᵀx for x [n, d], in x's dtype. The result is symmetric, so only panels of rows on and
    right of the diagonal are multiplied (one matmul per panel of `_GRAM_PANEL` rows) and the
    rest is mirrored: about (k+1)/2k of the full product's work for k panels, 0.58 for
    SmolLM2's 1536-wide down projection. Each entry is still one dot product over the n rows."""
    width = x.shape[1]
    if width <= _GRAM_PANEL:
        return torch.mm(x.t(), x)
    out = torch.empty(width, width, dtype=x.dtype, device=x.device)
    columns = x.t()
    for start in range(0, width, _GRAM_PANEL):
        stop = min(start + _GRAM_PANEL, width)
        out[start:stop, start:] = torch.mm(columns[start:stop], x[:, start:])
        out[stop:, start:stop] = out[start:stop, stop:].t()
    return out


class HessianAccumulator:
    """Running H = 2/n Σ x xᵀ over the rows of every input seen, accumulated in float32.

    bfloat16 inputs are multiplied in bfloat16 (products summed in float32 inside the matmul,
    each chunk's result rounded once to bfloat16, then added to the float32 total): on CPUs
    with bf16 units this is 2-3x faster than upcasting first, and the relative rounding of a
    chunk's product (~0.2 %) is far below the 1 % damping added to the diagonal. float16
    inputs are upcast, since x xᵀ over thousands of tokens overflows float16.

    ``float32_products`` upcasts bfloat16 inputs too. SparseGPT wants it: it divides by the
    inverse Hessian's diagonal to *choose* which weights to drop, so the per-chunk rounding
    reaches the sparsity masks, while GPTQ only sizes its updates with it.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu", *, float32_products: bool = False):
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.count = 0
        self.float32_products = float32_products

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1])
        n = x.shape[0]
        total = self.count + n
        self.hessian *= self.count / total
        if x.dtype == torch.bfloat16 and not self.float32_products:
            self.hessian.add_(gram(x).float(), alpha=2.0 / total)
        else:
            self.hessian.add_(gram(x.float()), alpha=2.0 / total)
        self.count = total
