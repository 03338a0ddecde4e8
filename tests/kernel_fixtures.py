"""Random QuantLinear layers and float64 references for the kernel tests."""

from __future__ import annotations

import torch

from compressor.kernels.quant_linear import QuantLinear


def random_quant_linear(
    out_features: int,
    in_features: int,
    *,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    dtype: torch.dtype = torch.bfloat16,
    bias: bool = False,
    generator: torch.Generator | None = None,
) -> QuantLinear:
    """Fresh random codes, scales (and zero points) in the full signed code range."""
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    groups = 1 if group_size is None else in_features // group_size
    codes = torch.randint(qmin, qmax + 1, (out_features, in_features), dtype=torch.int8, generator=generator)
    scale = torch.rand(out_features, groups, generator=generator) * 0.05 + 0.005
    zero = None if symmetric else torch.randint(qmin, qmax + 1, (out_features, groups), dtype=torch.int8, generator=generator)
    bias_tensor = torch.randn(out_features, generator=generator) if bias else None
    return QuantLinear.from_codes(codes, scale, zero, bits=bits, group_size=group_size, bias=bias_tensor, dtype=dtype)


def float64_reference(module: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """x @ W^T (+ bias) in float64 from the exact dequantized weight."""
    out = x.double() @ module.dequantized_weight(torch.float64).t()
    return out + module.bias.double() if module.bias is not None else out


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm()).item()


TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-4}
