"""The reference dequantization every kernel is checked against.

Works on the compressed-tensors ``pack-quantized`` tensors as stored (codes packed along the
input dimension, zero points packed along the output dimension), on any device.
"""

from __future__ import annotations

import torch

from compressor.kernels.packing import unpack_codes


def unpack_zero_points(zero_packed: torch.Tensor, bits: int, out_features: int, groups: int) -> torch.Tensor:
    """[ceil(out*bits/32), groups] int32 → [out, groups] signed int8 zero points."""
    return unpack_codes(zero_packed, bits, (out_features, groups), dim=0)


def dequantize_packed(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_packed: torch.Tensor | None,
    bits: int,
    in_features: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The weight as floats, ``(code - zero) * scale`` group by group, computed in fp32."""
    out_features, groups = scale.shape
    codes = unpack_codes(packed, bits, (out_features, in_features), dim=1).float().reshape(out_features, groups, -1)
    if zero_packed is not None:
        codes = codes - unpack_zero_points(zero_packed, bits, out_features, groups).float().unsqueeze(-1)
    weight = codes * scale.float().unsqueeze(-1)
    return weight.reshape(out_features, in_features).to(dtype or scale.dtype)
