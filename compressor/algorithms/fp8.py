"""FP8 (e4m3) weight quantization: one scale per output channel, codes by casting.

The plain scale maps each row's largest |weight| to the top of the e4m3 grid (448). With
``mse_search`` the scale is also tried at smaller fractions of that (down to half: one octave,
which moves every weight to a different spot of the floating grid's mantissa steps) and, per row,
the scale with the smallest squared reconstruction error wins; the weights above the top then
saturate. Calibration-free, like the MSE observer of the integer grids (compressor.algorithms.grid).
"""

from __future__ import annotations

import torch

from compressor.kernels.w8a8_linear import float8_max, to_codes

FLOAT8_DTYPE_NAME = "float8_e4m3fn"
MSE_SHRINK_STEPS = 41  # scale fractions from 1.0 down to MSE_LOWEST_FRACTION
MSE_LOWEST_FRACTION = 0.5


def float8_supported() -> bool:
    """Whether this torch has the FP8 e4m3 dtype (added in torch 2.1)."""
    return hasattr(torch, FLOAT8_DTYPE_NAME)


def float8_unsupported_message() -> str:
    return f"FP8 needs a torch with float8 dtypes (torch.{FLOAT8_DTYPE_NAME}); this torch {torch.__version__} has none"


def _row_scale(absmax: torch.Tensor, fraction: float, scale_dtype: torch.dtype) -> torch.Tensor:
    scale = absmax * fraction / float8_max()
    return torch.where(scale > 0, scale, torch.ones_like(scale)).to(scale_dtype).float()


def _row_error(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (to_codes(w / scale, "float").float() * scale - w).pow(2).sum(dim=1, keepdim=True)


@torch.no_grad()
def fp8_quantize(
    weight: torch.Tensor, scale_dtype: torch.dtype, *, mse_search: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 codes [out, in] and scales [out, 1] (rounded to `scale_dtype` before casting, so what is
    saved dequantizes to exactly what was chosen)."""
    w = weight.float()
    absmax = w.abs().amax(dim=1, keepdim=True)
    scale = _row_scale(absmax, 1.0, scale_dtype)
    if mse_search:
        best = _row_error(w, scale)
        for fraction in torch.linspace(1.0, MSE_LOWEST_FRACTION, MSE_SHRINK_STEPS)[1:].tolist():
            candidate = _row_scale(absmax, fraction, scale_dtype)
            error = _row_error(w, candidate)
            better = error < best
            best = torch.where(better, error, best)
            scale = torch.where(better, candidate, scale)
    return to_codes(w / scale, "float"), scale
