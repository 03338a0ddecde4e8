"""CPU fast path for 8-bit per-channel weights: PyTorch's ``_weight_int8pack_mm``.

The operator takes signed int8 codes [out, in] and one scale per output row, which is the
compressed-tensors layout unpacked (4 codes per int32 word). Asymmetric layers add
``-(z * scale)[n] * sum_k x[m, k]`` after the operator, in fp32. Grouped int8 layers have
no operator here and use the reference path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.kernels.cpu_int4 import DTYPES, MAX_ROWS, cpu_decode_reason
from compressor.kernels.packing import unpack_codes
from compressor.kernels.reference import unpack_zero_points


@dataclass
class Int8PackState:
    codes: torch.Tensor  # int8 [out, in]
    scale_f32: torch.Tensor  # [out]
    zero_times_scale: torch.Tensor | None  # [out] fp32, asymmetric layers only
    by_dtype: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)

    def scale(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self.by_dtype:
            self.by_dtype[dtype] = self.scale_f32.to(dtype).contiguous()
        return self.by_dtype[dtype]


class CpuInt8PackBackend:
    name = "cpu-int8pack"

    def __init__(self, max_rows: int = MAX_ROWS):
        self.max_rows = max_rows

    def unsupported(self, module: nn.Module, x: torch.Tensor) -> str | None:
        reason = cpu_decode_reason(module, x, 8, self.max_rows, "operator")
        if reason is not None:
            return reason
        if module.group_size is not None:
            return "operator takes one scale per output channel; layer is grouped"
        if x.dtype not in DTYPES:
            return f"operator takes fp32/bf16/fp16 activations, not {x.dtype}"
        return None

    def prepare(self, module: nn.Module, device: torch.device) -> Int8PackState:
        n, k = module.out_features, module.in_features
        codes = unpack_codes(module.weight_packed, 8, (n, k), dim=1).to(torch.int8).contiguous()
        scale = module.weight_scale.float().reshape(n)
        zero_times_scale = None
        if module.weight_zero_point is not None:
            zero_times_scale = unpack_zero_points(module.weight_zero_point, 8, n, 1).float().reshape(n) * scale
        return Int8PackState(codes, scale, zero_times_scale)

    def run(self, state: Int8PackState, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._weight_int8pack_mm(x.contiguous(), state.codes, state.scale(x.dtype))
        if state.zero_times_scale is None:
            return out
        correction = x.float().sum(dim=1, keepdim=True) * state.zero_times_scale
        return (out.float() - correction).to(x.dtype)
