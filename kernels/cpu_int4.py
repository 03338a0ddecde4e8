"""CPU fast path for 4-bit weights: PyTorch's packed int4 matmul (``_weight_int4pack_mm_for_cpu``).

The compressed-tensors layout (signed codes packed 8 per int32 along the input dimension) is
repacked once into the operator's own layout. The operator computes
``w = (q - 8) * scale + zero`` with unsigned ``q`` in [0, 15] and a float ``zero`` per group:
our signed code ``c`` is ``q - 8``, so a symmetric layer has ``zero = 0`` and an asymmetric one
``zero = -z * scale`` (``z`` the integer zero point). The operator takes scales and zeros in
the activation's dtype, so for bf16 activations ``-z * scale`` is rounded to bf16 (as large an
error as the reference path's own rounding of each weight to bf16).

Constraints of the operator, checked in ``unsupported``: group size 32/64/128/256 (a
per-channel layer uses the largest of these that divides its input width, repeating its one
scale), and a row count divisible by 16 (rows are zero-padded at repack time).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.kernels.packing import unpack_codes
from compressor.kernels.reference import unpack_zero_points

OP_GROUP_SIZES = (256, 128, 64, 32)
ROW_MULTIPLE = 16
# Above this many input rows (prefill) the dequantize-then-bf16-matmul path wins on CPU
# (measured at 4096x14336: int4 op 106 ms vs bf16 74 ms at 32 rows, 504 vs 207 ms at 128).
MAX_ROWS = 16
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def op_group_size(in_features: int, group_size: int | None) -> int | None:
    if group_size is not None:
        return group_size if group_size in OP_GROUP_SIZES else None
    return next((g for g in OP_GROUP_SIZES if in_features % g == 0), None)


@dataclass
class Int4PackState:
    packed: torch.Tensor  # the operator's uint8 layout
    group_size: int
    out_features: int
    scales_and_zeros_f32: torch.Tensor  # [K / group, N padded, 2]
    by_dtype: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)

    def scales_and_zeros(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self.by_dtype:
            self.by_dtype[dtype] = self.scales_and_zeros_f32.to(dtype).contiguous()
        return self.by_dtype[dtype]


def repack_int4(module: nn.Module) -> Int4PackState:
    """The operator's packed weight, scales and zeros from a QuantLinear's buffers."""
    n, k = module.out_features, module.in_features
    group = op_group_size(k, module.group_size)
    padded = -(-n // ROW_MULTIPLE) * ROW_MULTIPLE
    codes = unpack_codes(module.weight_packed, 4, (n, k), dim=1).to(torch.int32) + 8
    unsigned = torch.zeros(padded, k, dtype=torch.int32, device=codes.device)
    unsigned[:n] = codes
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 1)
    scale = module.weight_scale.float()  # [n, groups]; per-channel: repeat its one scale per op group
    zero = torch.zeros_like(scale)
    if module.weight_zero_point is not None:
        zero = -unpack_zero_points(module.weight_zero_point, 4, n, module.groups).float() * scale
    if module.group_size is None:
        scale, zero = scale.expand(n, k // group), zero.expand(n, k // group)
    table = torch.zeros(k // group, padded, 2, dtype=torch.float32, device=codes.device)
    table[:, :n, 0] = scale.t()
    table[:, :n, 1] = zero.t()
    return Int4PackState(packed, group, n, table)


def cpu_decode_reason(module: nn.Module, x: torch.Tensor, bits: int, max_rows: int, what: str) -> str | None:
    """What every CPU decode backend checks first: a CPU input, the layer's bit width, and no
    more rows than the packed path beats dequantize + matmul at. None when all hold."""
    if x.device.type != "cpu":
        return "needs a CPU tensor"
    if module.bits != bits:
        return f"int{bits} {what}; layer is int{module.bits}"
    if x.numel() // module.in_features > max_rows:
        return f"more than {max_rows} rows: dequantize + dense matmul is faster on CPU"
    return None


class CpuInt4PackBackend:
    name = "cpu-int4pack"

    def __init__(self, max_rows: int = MAX_ROWS):
        self.max_rows = max_rows

    def unsupported(self, module: nn.Module, x: torch.Tensor) -> str | None:
        reason = cpu_decode_reason(module, x, 4, self.max_rows, "operator")
        if reason is not None:
            return reason
        if op_group_size(module.in_features, module.group_size) is None:
            return f"operator needs group size 32/64/128/256; layer has {module.group_size or 'per-channel'} over {module.in_features} columns"
        if x.dtype not in DTYPES:
            return f"operator takes fp32/bf16/fp16 activations, not {x.dtype}"
        return None

    def prepare(self, module: nn.Module, device: torch.device) -> Int4PackState:
        return repack_int4(module)

    def run(self, state: Int4PackState, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.contiguous(), state.packed, state.group_size, state.scales_and_zeros(x.dtype)
        )
        return out[:, : state.out_features] if out.shape[1] != state.out_features else out


__all__ = ["CpuInt4PackBackend", "Int4PackState", "repack_int4", "op_group_size"]
