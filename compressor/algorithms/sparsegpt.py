"""SparseGPT (Frantar & Alistarh, 2023): prune a layer in one shot and update the weights
that remain so the layer's output on the calibration inputs changes as little as possible.

Columns are visited left to right in blocks of `block_size`. A weight set to zero leaves an
error that the optimal brain surgeon update pushes onto the columns not yet visited,
weighted by the upper Cholesky factor of the inverse Hessian (the same factor GPTQ uses).
Inside a block the updates are applied eagerly; to the columns past the block they are
applied once per block ("lazy batch" updates).

Mask selection is adaptive, as in the paper: an unstructured mask is chosen per block of
columns from ``w² / [H⁻¹]²_ii`` over all rows of the block; an N:M mask is chosen per group
of M columns when the first column of the group is reached, so it sees the updates made so far.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.algorithms.gptq import _inverse_hessian_factor
from compressor.algorithms.masks import NMPattern, nm_mask, unstructured_mask


@dataclass
class HessianFactor:
    """The upper Cholesky factor of the damped inverse Hessian, shared by layers with one input."""

    upper: torch.Tensor | None  # [in, in], None when the Hessian could not be factored
    dead: torch.Tensor  # [in] bool: input columns that never saw a non-zero value
    damping: float


def factor_hessian(hessian: torch.Tensor, dampening: float) -> HessianFactor:
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    upper, damping = _inverse_hessian_factor(h, dampening)
    return HessianFactor(upper, dead, damping)


@dataclass
class SparseGPTResult:
    weight: torch.Tensor  # [out, in], same dtype as the input weight, pruned entries exactly 0
    error: float  # the OBS objective: sum of pruned (w²/d²) / 2, summed over columns
    fallback: str | None = None


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    factor: HessianFactor,
    *,
    sparsity: float | None = None,
    pattern: NMPattern | None = None,
    block_size: int = 128,
) -> SparseGPTResult:
    """Prune `weight` [out, in] to `sparsity` (unstructured) or `pattern` (N:M)."""
    if (sparsity is None) == (pattern is None):
        raise ValueError("give exactly one of sparsity or pattern")
    if pattern is not None and block_size % pattern.group:
        raise ValueError(f"block_size {block_size} must be a multiple of {pattern.group} for {pattern}")
    if factor.upper is None:
        return _magnitude_fallback(weight, sparsity, pattern)

    hinv = factor.upper
    wt = weight.float().t().contiguous()  # [in, out]: one input column per contiguous row
    wt[factor.dead] = 0.0
    in_features = wt.shape[0]
    total_error = 0.0
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        block = wt[start:end].clone()
        hinv_block = hinv[start:end, start:end]
        diag = torch.diag(hinv_block).unsqueeze(1)  # [b, 1]
        if sparsity is not None:
            keep = unstructured_mask(block.pow(2) / diag.pow(2), sparsity, per_row=False)
        else:
            keep = torch.ones_like(block, dtype=torch.bool)
        errors = torch.empty_like(block)
        for i in range(end - start):
            if pattern is not None and i % pattern.group == 0:
                stop = i + pattern.group
                scores = block[i:stop].pow(2) / diag[i:stop].pow(2)
                keep[i:stop] = nm_mask(scores.t().contiguous(), pattern).t()
            current = block[i]
            kept = current * keep[i]
            err = (current - kept) / hinv_block[i, i]
            errors[i] = err
            block[i:].addr_(hinv_block[i, i:], err, alpha=-1.0)
            block[i] = kept  # equal up to rounding; exact zeros matter
        total_error += float(errors.pow(2).sum()) / 2
        wt[start:end] = block
        wt[end:].addmm_(hinv[start:end, end:].t(), errors, alpha=-1.0)
    return SparseGPTResult(wt.t().to(weight.dtype).contiguous(), total_error)


def _magnitude_fallback(weight: torch.Tensor, sparsity: float | None, pattern: NMPattern | None) -> SparseGPTResult:
    scores = weight.float().abs()
    keep = nm_mask(scores, pattern) if pattern is not None else unstructured_mask(scores, sparsity or 0.0, per_row=True)
    return SparseGPTResult(weight * keep, float("nan"), "Hessian not positive definite: magnitude pruning")
