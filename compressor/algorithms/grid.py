"""Integer quantization grids: ranges, scales, zero points, codes.

Codes always live in the signed range ``[-2^(b-1), 2^(b-1) - 1]``, as compressed-tensors
stores them; an asymmetric grid adds a zero point in that same range. Scales are rounded to
the dtype they will be saved in *before* codes are computed, so that what is saved
dequantizes to exactly what the algorithm optimised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_FALLBACK_GROUP = 16


@dataclass(frozen=True)
class WeightGrid:
    """How one Linear's weight is quantized."""

    bits: int
    symmetric: bool
    group_size: int | None  # None: one scale per output channel
    scale_dtype: torch.dtype = torch.bfloat16
    mse_search: bool = False
    hqq_search: bool = False  # half-quadratic refinement of min-max (compressor.algorithms.hqq)

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def columns_per_group(self, in_features: int) -> int:
        return in_features if self.group_size is None else self.group_size


def effective_group_size(in_features: int, group_size: int | None) -> int | None:
    """The group size used for a layer with `in_features` columns.

    A group as wide as the row or wider is one scale per output channel (None), which is what
    one group spanning the row is, and how compressed-tensors, llm-compressor and GPTQModel
    count it (ceil(columns / group) = 1 group). compressed-tensors (and so transformers and
    vLLM) need the group size to divide the columns: a partial last group (GPTQModel's
    ceil-div groups) does not load there. When the asked size does not divide (SmolLM2: 576
    columns, group 128), the layer uses the largest power of two that is at most the asked size
    and divides the columns (576 → 64): finer, never coarser than asked, and a size every kernel
    knows. Below 16 columns it falls back to one scale per channel.
    """
    if group_size is None or in_features % group_size == 0:
        return group_size
    if group_size > in_features:
        return None
    size = 1 << (group_size.bit_length() - 1)
    while size >= MIN_FALLBACK_GROUP:
        if in_features % size == 0:
            return size
        size //= 2
    return None


def _scale_zero_from_range(
    wmin: torch.Tensor, wmax: torch.Tensor, grid: WeightGrid
) -> tuple[torch.Tensor, torch.Tensor | None]:
    wmin = torch.minimum(wmin, torch.zeros_like(wmin))
    wmax = torch.maximum(wmax, torch.zeros_like(wmax))
    levels = grid.qmax - grid.qmin
    if grid.symmetric:
        scale = torch.maximum(wmin.abs(), wmax) / (levels / 2)
        zero = None
    else:
        scale = (wmax - wmin) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.to(grid.scale_dtype).to(torch.float32)
    if not grid.symmetric:
        zero = torch.clamp(torch.round(grid.qmin - wmin / scale), grid.qmin, grid.qmax)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, grid: WeightGrid) -> torch.Tensor:
    """Integer codes (as float) of `w` on the grid; scale/zero broadcast against `w`."""
    q = torch.round(w / scale)
    if zero is not None:
        q = q + zero
    return torch.clamp(q, grid.qmin, grid.qmax)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    return (q - zero) * scale if zero is not None else q * scale


MSE_SHRINK_STEPS = 21  # clip ratios tried by the MSE observer, from 1.0 down to MSE_LOWEST_RATIO
MSE_LOWEST_RATIO = 0.5
_MSE_RATIOS = torch.linspace(1.0, MSE_LOWEST_RATIO, MSE_SHRINK_STEPS)


def group_scale_zero(w: torch.Tensor, grid: WeightGrid) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero for each row of `w` ([rows, columns] → [rows, 1]).

    With ``mse_search`` the range is shrunk over a grid of clip ratios and, per row, the
    ratio with the smallest squared reconstruction error wins (calibration-free). With
    ``hqq_search`` min-max is refined by half-quadratic optimisation (calibration-free).
    """
    wmin = w.amin(dim=1, keepdim=True)
    wmax = w.amax(dim=1, keepdim=True)
    scale, zero = _scale_zero_from_range(wmin, wmax, grid)
    if grid.hqq_search:
        from compressor.algorithms.hqq import hqq_scale_zero

        return hqq_scale_zero(w, scale, zero, qmin=grid.qmin, qmax=grid.qmax, scale_dtype=grid.scale_dtype)
    if not grid.mse_search:
        return scale, zero
    best_err = torch.full_like(scale, float("inf"))
    for ratio in _MSE_RATIOS.tolist():
        s, z = _scale_zero_from_range(wmin * ratio, wmax * ratio, grid)
        err = (dequantize_codes(quantize_codes(w, s, z, grid), s, z) - w).pow(2).sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        scale = torch.where(better, s, scale)
        if zero is not None and z is not None:
            zero = torch.where(better, z, zero)
    return scale, zero


def weight_scale_zero(weight: torch.Tensor, grid: WeightGrid) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales/zeros of a whole weight: [out, groups] each."""
    out_features, in_features = weight.shape
    per_group = grid.columns_per_group(in_features)
    groups = in_features // per_group
    rows = weight.float().reshape(out_features * groups, per_group)
    scale, zero = group_scale_zero(rows, grid)
    scale = scale.reshape(out_features, groups)
    zero = zero.reshape(out_features, groups) if zero is not None else None
    return scale, zero


def expand_groups(values: torch.Tensor, in_features: int) -> torch.Tensor:
    """[out, groups] → [out, in_features], each group's value repeated over its columns."""
    groups = values.shape[1]
    return values.repeat_interleave(in_features // groups, dim=1)
