"""FP8 (e4m3) weight quantization: one scale per output channel, codes by casting."""

from __future__ import annotations

import torch

from compressor.kernels.w8a8_linear import float8_max, to_codes

FLOAT8_DTYPE_NAME = "float8_e4m3fn"


def float8_supported() -> bool:
    """Whether this torch has the FP8 e4m3 dtype (added in torch 2.1)."""
    return hasattr(torch, FLOAT8_DTYPE_NAME)


def float8_unsupported_message() -> str:
    return f"FP8 needs a torch with float8 dtypes (torch.{FLOAT8_DTYPE_NAME}); this torch {torch.__version__} has none"


@torch.no_grad()
def fp8_quantize(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 codes [out, in] and scales [out, 1] (rounded to `scale_dtype` before casting)."""
    w = weight.float()
    scale = w.abs().amax(dim=1, keepdim=True) / float8_max()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(scale_dtype).float()
    return to_codes(w / scale, "float"), scale
