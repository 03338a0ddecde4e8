"""Round-to-nearest: quantize each weight on its group's grid, no calibration."""

from __future__ import annotations

import torch

from compressor.algorithms.grid import WeightGrid, expand_groups, quantize_codes, weight_scale_zero


@torch.no_grad()
def rtn_quantize(weight: torch.Tensor, grid: WeightGrid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Codes ([out, in], int8), scales and zeros ([out, groups]) for `weight`."""
    w = weight.float()
    scale, zero = weight_scale_zero(w, grid)
    in_features = w.shape[1]
    full_zero = expand_groups(zero, in_features) if zero is not None else None
    codes = quantize_codes(w, expand_groups(scale, in_features), full_zero, grid)
    return codes.to(torch.int8), scale, zero
