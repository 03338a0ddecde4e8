"""AWQ (Lin et al., 2023): activation-aware per-channel scaling before weight quantization.

For a group of Linears that read the same input X, channel j of the input is divided by
s_j and column j of every weight multiplied by s_j; the division is folded into the module
that produced X (a norm's weight, or the rows of a Linear), so the float model computes the
same function, while the columns that see large activations get a finer quantization grid.

The scale comes from a grid search over an exponent r in [0, 1):

    s = mean|X|^r / mean|W|^(1 - r)     (duo scaling; mean|X|^r alone otherwise)
    s = s / sqrt(max(s) min(s))

and the winner minimises the output error of the group's layers,
sum over layers of |X W^T - (X / s) Q(W s)^T|^2. s = 1 (no scaling) is always one of the
candidates, so on the tokens it searches with, AWQ is never worse than plain quantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compressor.algorithms.grid import WeightGrid, dequantize_codes, expand_groups, quantize_codes, weight_scale_zero


def fake_quantize(weight: torch.Tensor, grid: WeightGrid) -> torch.Tensor:
    """The weight as its quantized version dequantizes (float32)."""
    w = weight.float()
    scale, zero = weight_scale_zero(w, grid)
    in_features = w.shape[1]
    full_scale = expand_groups(scale, in_features)
    full_zero = expand_groups(zero, in_features) if zero is not None else None
    return dequantize_codes(quantize_codes(w, full_scale, full_zero, grid), full_scale, full_zero)


def weight_magnitude(weights: list[torch.Tensor], grids: list[WeightGrid | None]) -> torch.Tensor:
    """Mean over output rows of |W| normalised by its group's largest |W|: [in_features]."""
    rows = []
    for weight, grid in zip(weights, grids):
        w = weight.float().abs()
        per_group = w.shape[1] if grid is None else grid.columns_per_group(w.shape[1])
        grouped = w.reshape(w.shape[0], -1, per_group)
        grouped = grouped / grouped.amax(dim=2, keepdim=True).clamp_min(1e-8)
        rows.append(grouped.reshape(w.shape[0], -1))
    return torch.cat(rows, dim=0).mean(dim=0)


def candidate_scale(x_mean: torch.Tensor, w_mean: torch.Tensor | None, ratio: float) -> torch.Tensor:
    """The per-channel scale for one exponent of the grid, normalised around 1."""
    if w_mean is not None:
        scale = x_mean.pow(ratio) / w_mean.pow(1 - ratio).clamp_min(1e-4)
    else:
        scale = x_mean.pow(ratio)
    scale = scale.clamp_min(1e-4)
    return scale / (scale.max() * scale.min()).sqrt()


def scaled_output_error(
    x: torch.Tensor, weights: list[torch.Tensor], grids: list[WeightGrid | None], scale: torch.Tensor,
    references: list[torch.Tensor],
) -> float:
    """Mean squared error of the group's outputs with inputs / scale and quantized weights * scale.

    A layer without a grid (left unquantized by the recipe) is scaled but not quantized: it
    contributes only floating-point rounding.
    """
    x_scaled = x / scale
    total, count = 0.0, 0
    for weight, grid, reference in zip(weights, grids, references):
        w = weight.float() * scale
        w = fake_quantize(w, grid) if grid is not None else w
        total += float((x_scaled @ w.t() - reference).pow(2).sum())
        count += reference.numel()
    return total / count


@dataclass
class ScaleSearch:
    scale: torch.Tensor  # [in_features] float32
    ratio: float | None  # the winning exponent; None when no scaling won
    errors: list[float]  # one per grid point
    unscaled_error: float  # the error with s = 1


@torch.no_grad()
def search_scale(
    x: torch.Tensor,
    x_mean: torch.Tensor,
    weights: list[torch.Tensor],
    grids: list[WeightGrid | None],
    *,
    grid_points: int = 20,
    duo_scaling: bool = True,
) -> ScaleSearch:
    """Grid search of the scaling exponent for one group (x: [tokens, in] sample of its input)."""
    x = x.float()
    references = [x @ w.float().t() for w in weights]
    w_mean = weight_magnitude(weights, grids) if duo_scaling else None
    errors: list[float] = []
    ones = torch.ones_like(x_mean, dtype=torch.float32)
    unscaled = scaled_output_error(x, weights, grids, ones, references)
    best = ScaleSearch(ones, None, errors, unscaled)
    best_error = unscaled
    for step in range(grid_points):
        ratio = step / grid_points
        scale = candidate_scale(x_mean.float(), w_mean, ratio)
        error = scaled_output_error(x, weights, grids, scale, references)
        errors.append(error)
        if error < best_error:
            best, best_error = ScaleSearch(scale, ratio, errors, unscaled), error
    return best


# --- folding -------------------------------------------------------------------------------


def producer_kind(module: nn.Module, channels: int) -> str | None:
    """How `module`'s output channels can absorb a division: 'linear', 'norm' or None."""
    if isinstance(module, nn.Linear):
        return "linear" if module.out_features == channels else None
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1 and weight.numel() == channels:
        if next(module.children(), None) is None:
            return "norm"
    return None


@torch.no_grad()
def fold_scale(producer: nn.Module, consumers: list[nn.Linear], scale: torch.Tensor) -> None:
    """Divide the producer's output channels by `scale`, multiply the consumers' columns by it.

    Computed in float32 and written back in each parameter's dtype.
    """
    inverse = 1.0 / scale.float()
    if isinstance(producer, nn.Linear):
        producer.weight.copy_(producer.weight.float() * inverse[:, None])
    else:
        producer.weight.copy_(producer.weight.float() * inverse)
    bias = getattr(producer, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.shape == scale.shape:
        bias.copy_(bias.float() * inverse)
    for consumer in consumers:
        consumer.weight.copy_(consumer.weight.float() * scale.float()[None, :])
