"""QuantLinear: a Linear whose weight is stored as packed integer codes.

Buffers carry exactly the tensors of the compressed-tensors ``pack-quantized`` format
(``weight_packed``, ``weight_scale``, ``weight_zero_point``, ``weight_shape``), so a model
holding these modules saves straight to that format and loads back without conversion.

``forward`` uses the reference path: dequantize the weight, then matmul. It is
differentiable with respect to the input (the codes are frozen buffers), so training stages
can run on top of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compressor.kernels.packing import pack_codes, unpack_codes


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int | None,
        symmetric: bool,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        groups = 1 if group_size is None else in_features // group_size
        words = -(-in_features * bits // 32)
        self.register_buffer("weight_packed", torch.zeros(out_features, words, dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64, device=device))
        if not symmetric:
            zp_rows = -(-out_features * bits // 32)
            self.register_buffer("weight_zero_point", torch.zeros(zp_rows, groups, dtype=torch.int32, device=device))
        else:
            self.weight_zero_point = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor | None,
        *,
        bits: int,
        group_size: int | None,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> "QuantLinear":
        out_features, in_features = codes.shape
        module = cls(
            in_features,
            out_features,
            bits=bits,
            group_size=group_size,
            symmetric=zero is None,
            bias=bias is not None,
            dtype=dtype,
            device=codes.device,
        )
        module.weight_packed.copy_(pack_codes(codes, bits, dim=1))
        module.weight_scale.copy_(scale.to(dtype))
        if zero is not None:
            module.weight_zero_point.copy_(pack_codes(zero.to(torch.int8), bits, dim=0))
        if bias is not None:
            module.bias.data.copy_(bias.detach().to(dtype))
        return module

    @property
    def groups(self) -> int:
        return self.weight_scale.shape[1]

    def codes(self) -> torch.Tensor:
        return unpack_codes(self.weight_packed, self.bits, (self.out_features, self.in_features), dim=1)

    def zero_points(self) -> torch.Tensor | None:
        if self.weight_zero_point is None:
            return None
        return unpack_codes(self.weight_zero_point, self.bits, (self.out_features, self.groups), dim=0)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as floats: (codes - zero) * scale, group by group."""
        codes = self.codes().float().reshape(self.out_features, self.groups, -1)
        zero = self.zero_points()
        if zero is not None:
            codes = codes - zero.float().unsqueeze(-1)
        weight = codes * self.weight_scale.float().unsqueeze(-1)
        return weight.reshape(self.out_features, self.in_features).to(dtype or self.weight_scale.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        group = "channel" if self.group_size is None else f"group={self.group_size}"
        sym = "sym" if self.symmetric else "asym"
        return f"in={self.in_features}, out={self.out_features}, w{self.bits} {group} {sym}"
