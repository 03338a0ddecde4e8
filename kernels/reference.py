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
    """The weight as floats, ``(code - zero) * scale`` group by group, rounded once to `dtype`.

    Codes and zero points are small integers (|code - zero| <= 255) and the scale has at most 24
    significant bits, so where the scale has the output dtype (or the output is fp32) each
    product is one multiplication in the output dtype, rounded once: the same value as computing
    in fp32 and casting, with a half to a quarter of the memory traffic. That is what a
    compressed model's prefill and perplexity pay on every forward (at SmolLM2's 576 x 1536 on
    CPU: 2.4 ms in fp32 against a 1.1 ms matmul of 256 rows). Other pairs (a bf16 scale for an
    fp16 output) compute in fp32 as before."""
    out_features, groups = scale.shape
    target = dtype or scale.dtype
    compute = target if scale.dtype == target or target == torch.float32 else torch.float32
    codes = unpack_codes(packed, bits, (out_features, in_features), dim=1).to(compute).reshape(out_features, groups, -1)
    if zero_packed is not None:
        codes = codes - unpack_zero_points(zero_packed, bits, out_features, groups).to(compute).unsqueeze(-1)
    weight = codes * scale.to(compute).unsqueeze(-1)
    return weight.reshape(out_features, in_features).to(target)
