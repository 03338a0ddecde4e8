"""SmoothQuant: move activation outliers into the weights with a per-channel scale.

For Linear layers that read the output ``x`` of a normalization layer, divide every input
channel ``j`` of ``x`` by ``s_j`` and multiply column ``j`` of each of those Linears by
``s_j``: the float function is unchanged, but the activations are flatter and quantize
better. The division is folded into the norm's own weight (and bias), so it costs nothing
at run time. With migration strength ``alpha``::

    s_j = max|x_j| ** alpha / max_i |W_ij| ** (1 - alpha)

where the weight maximum runs over the rows of every Linear sharing the input.
"""

from __future__ import annotations

import torch
from torch import nn

MIN_SCALE = 1e-5


def smoothing_scales(activation_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-input-channel scales s (float32, [in]); channels never seen active keep s = 1."""
    act = activation_absmax.float().clamp(min=MIN_SCALE)
    wmax = weight_absmax.float().clamp(min=MIN_SCALE)
    scales = (act.pow(alpha) / wmax.pow(1 - alpha)).clamp(min=MIN_SCALE)
    return torch.where(activation_absmax > 0, scales, torch.ones_like(scales))


def columns_absmax(linears: list[nn.Linear]) -> torch.Tensor:
    """max_i |W_ij| over the rows of every Linear in the list: [in]."""
    return torch.stack([m.weight.detach().abs().float().amax(dim=0) for m in linears]).amax(dim=0)


def is_foldable_norm(module: nn.Module, channels: int) -> bool:
    """A module whose output is its input times a per-channel weight (RMSNorm, LayerNorm)."""
    weight = getattr(module, "weight", None)
    return (
        not isinstance(module, nn.Linear)
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 1
        and weight.shape[0] == channels
    )


@torch.no_grad()
def fold_smoothing(norm: nn.Module, linears: list[nn.Linear], scales: torch.Tensor) -> None:
    """Divide the norm's output channels by `scales` and scale the Linears' columns up by them."""
    norm.weight.data = (norm.weight.float() / scales).to(norm.weight.dtype)
    bias = getattr(norm, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.data = (bias.float() / scales).to(bias.dtype)
    for linear in linears:
        linear.weight.data = (linear.weight.float() * scales).to(linear.weight.dtype)


def smoothed_hessian(hessian: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The Hessian of inputs x / s, from the Hessian of x: H_ij / (s_i s_j)."""
    inverse = 1.0 / scales.to(hessian.dtype)
    return hessian * inverse[:, None] * inverse[None, :]
