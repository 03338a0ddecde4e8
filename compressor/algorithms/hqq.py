"""Half-quadratic quantization (HQQ, Badri & Shaji 2023): calibration-free search for each
group's scale and zero point that minimises an Lp (p < 1) norm of the weight error.

The error term is split off as a sparse variable W_e (the half-quadratic splitting):

    W_q  = clamp(round(W / s + z))                  codes on the current grid
    W_e  = shrink_p(W - (W_q - z) s, beta)          proximal step for |.|^p, p = 0.7
    z    = mean(W_q - (W - W_e) / s)                the quadratic sub-problem in z
    beta = kappa * beta

so outliers end up in W_e and stop pulling the grid away from the bulk of the weights.

Differences from the reference implementation, both forced by the on-disk format:
- compressed-tensors stores zero points as integers, so the zero update is rounded to the
  integer grid (HQQ keeps it fractional);
- the same quadratic sub-problem is also solved in closed form for the scale
  (s = <W - W_e, W_q - z> / |W_q - z|^2), the only free variable on a symmetric grid.
Every row keeps the (scale, zero) with the smallest mean absolute error seen, starting from
min-max, so the result is never worse than min-max by that measure (HQQ's own criterion).
"""

from __future__ import annotations

import torch

LP_NORM = 0.7
BETA = 10.0
KAPPA = 1.01
ITERATIONS = 20


def shrink_lp(x: torch.Tensor, beta: float, p: float = LP_NORM) -> torch.Tensor:
    """The generalised soft-threshold: the proximal operator of |x|^p / beta."""
    magnitude = x.abs()
    return torch.sign(x) * torch.relu(magnitude - magnitude.pow(p - 1) / beta)


def _round_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return scale.to(dtype).to(torch.float32)


@torch.no_grad()
def hqq_scale_zero(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    *,
    qmin: int,
    qmax: int,
    scale_dtype: torch.dtype,
    iterations: int = ITERATIONS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Refine per-row (scale [rows, 1], zero [rows, 1] or None) for `w` [rows, columns]."""
    w = w.float()
    z = zero if zero is not None else torch.zeros_like(scale)

    def codes_and_error(s: torch.Tensor, zp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.clamp(torch.round(w / s + zp), qmin, qmax)
        return q, (w - (q - zp) * s).abs().mean(dim=1, keepdim=True)

    best_scale, best_zero = scale.clone(), z.clone()
    q, best_error = codes_and_error(scale, z)
    s, beta = scale, BETA
    for _ in range(iterations):
        offset = q - z
        target = w - shrink_lp(w - offset * s, beta)
        norm = offset.pow(2).sum(dim=1, keepdim=True)
        fitted = (target * offset).sum(dim=1, keepdim=True) / norm.clamp_min(1e-12)
        s = _round_scale(torch.where((norm > 0) & (fitted > 0), fitted, s), scale_dtype)
        if zero is not None:
            z = torch.clamp(torch.round((q - target / s).mean(dim=1, keepdim=True)), qmin, qmax)
        beta *= KAPPA
        q, error = codes_and_error(s, z)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, s, best_scale)
        best_zero = torch.where(better, z, best_zero)
    return best_scale, (best_zero if zero is not None else None)
