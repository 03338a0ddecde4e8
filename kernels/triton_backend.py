"""QuantLinear backend for CUDA tensors: the Triton W4A16/W8A16 custom op.

The kernel reads the compressed-tensors buffers as they are, so ``prepare`` only makes them
contiguous on the device. Availability of Triton and a CUDA device is checked lazily, so a
CPU-only install never imports Triton.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compressor.extras import install_hint, is_installed

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class WxA16State:
    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int
    counters: torch.Tensor  # the kernels' split-K counters (zero between calls)


class TritonWxA16Backend:
    name = "triton-wxa16"

    def unsupported(self, module: nn.Module, x: torch.Tensor) -> str | None:
        if x.device.type != "cuda":
            return "needs a CUDA device"
        if not is_installed("triton"):
            return f"triton is not installed ({install_hint('triton')})"
        if module.bits not in (4, 8):
            return f"kernel handles int4/int8; layer is int{module.bits}"
        if x.dtype not in DTYPES:
            return f"kernel takes fp16/bf16/fp32 activations, not {x.dtype}"
        group = module.group_size or module.in_features
        if group % 16:
            return f"kernel needs the group size (or input width) a multiple of 16; layer has {group}"
        return None

    def prepare(self, module: nn.Module, device: torch.device) -> WxA16State:
        from compressor.kernels.triton_parts import split_k_counters

        zero = module.weight_zero_point.contiguous() if module.weight_zero_point is not None else None
        return WxA16State(
            module.weight_packed.contiguous(),
            module.weight_scale.contiguous(),
            zero,
            module.bits,
            module.group_size or module.in_features,
            split_k_counters(module.out_features, device),
        )

    def run(self, state: WxA16State, x: torch.Tensor) -> torch.Tensor:
        from compressor.kernels.triton_ops import wxa16_linear

        return wxa16_linear(x, state.packed, state.scale, state.zero, state.bits, state.group_size, state.counters)
