"""W8A8Linear backends: the codes × codes products of ``compressor::w8a8_linear``.

- ``int8-int-mm``: int8 weights and int8 activations through ``torch._int_mm`` (CPU and CUDA);
- ``fp8-scaled-mm``: FP8 e4m3 weights and activations through ``torch._scaled_mm`` (CUDA with
  compute capability ≥ 8.9; on CPU only when asked for, ``Fp8ScaledMmBackend(on_cpu=True)``:
  PyTorch's CPU ``_scaled_mm`` converts the FP8 codes element by element and measured 0.7–0.9 ×
  the speed of the reference path, so the default registry leaves CPU FP8 layers to the reference).

Each says why it cannot run a layer (the shape and device rules of the PyTorch operator),
so the layer falls back to the reference path (dequantize, then matmul) with the reason kept
in ``kernel_report``. Weight-only layers (FP8 W8A16) have no activation codes to multiply and
always use the reference path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# torch._int_mm on CUDA: more than 16 rows, K and N multiples of 8 (cuBLASLt int8 GEMM rules).
INT_MM_CUDA_MIN_ROWS = 17
INT_MM_CUDA_MULTIPLE = 8
# torch._scaled_mm on CUDA: FP8 tensor cores (Ada / Hopper and later), K and N multiples of 16.
SCALED_MM_MIN_CAPABILITY = (8, 9)
SCALED_MM_CUDA_MULTIPLE = 16
CPU_SCALED_MM_SLOWER = (
    "torch._scaled_mm on CPU converts FP8 element by element: 0.7-0.9x the reference path's speed"
    " (benchmarks/cpu_w8a8_kernels.py)"
)


@dataclass(frozen=True)
class W8A8State:
    weight_t: torch.Tensor  # [K, N] view of the stored [N, K] codes (column-major)
    weight_scale: torch.Tensor  # [1, N] float32
    input_scale: torch.Tensor | None  # [1] float32 for static activations


def prepare_state(module: nn.Module, device: torch.device) -> W8A8State:
    """Both backends read the stored codes as they are; only the scales become fp32 once."""
    weight = module.weight.to(device).contiguous()
    scale = module.weight_scale.to(device=device, dtype=torch.float32).reshape(1, -1).contiguous()
    input_scale = None
    if module.input_scale is not None:
        input_scale = module.input_scale.to(device=device, dtype=torch.float32).reshape(1).contiguous()
    return W8A8State(weight.t(), scale, input_scale)


def _common_reason(module: nn.Module, x: torch.Tensor, kind: str) -> str | None:
    if module.activations is None:
        return "weight-only layer: no activation codes to multiply"
    if module.weight_type != kind or module.activations.type != kind:
        label = {"int": "int8", "float": "FP8"}
        return (f"multiplies {label[kind]} × {label[kind]} codes; layer is {label[module.weight_type]} weights"
                f" × {label[module.activations.type]} activations")
    if x.device.type not in ("cpu", "cuda"):
        return f"runs on CPU or CUDA, not {x.device.type}"
    if x.dtype not in DTYPES:
        return f"takes fp32/bf16/fp16 activations, not {x.dtype}"
    return None


def _run(state: W8A8State, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    from compressor.kernels.w8a8_ops import needs_custom_op, w8a8_linear, w8a8_linear_eager

    op = w8a8_linear if needs_custom_op(x) else w8a8_linear_eager
    return op(x, state.weight_t, state.weight_scale, state.input_scale, bias)


class Int8IntMmBackend:
    name = "int8-int-mm"

    def unsupported(self, module: nn.Module, x: torch.Tensor) -> str | None:
        reason = _common_reason(module, x, "int")
        if reason is not None:
            return reason
        if x.device.type == "cuda":
            rows = x.numel() // module.in_features
            if rows < INT_MM_CUDA_MIN_ROWS:
                return f"torch._int_mm on CUDA needs more than 16 rows; input has {rows}"
            if module.in_features % INT_MM_CUDA_MULTIPLE or module.out_features % INT_MM_CUDA_MULTIPLE:
                return f"torch._int_mm on CUDA needs in/out features multiples of 8; layer is {module.in_features}x{module.out_features}"
        return None

    def prepare(self, module: nn.Module, device: torch.device) -> W8A8State:
        return prepare_state(module, device)

    def run(self, state: W8A8State, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return _run(state, x, bias)


class Fp8ScaledMmBackend:
    name = "fp8-scaled-mm"

    def __init__(self, on_cpu: bool = False):
        self.on_cpu = on_cpu

    def unsupported(self, module: nn.Module, x: torch.Tensor) -> str | None:
        reason = _common_reason(module, x, "float")
        if reason is not None:
            return reason
        if x.device.type == "cpu" and not self.on_cpu:
            return CPU_SCALED_MM_SLOWER
        if not hasattr(torch, "_scaled_mm"):
            return "this torch has no torch._scaled_mm"
        if x.device.type == "cuda":
            capability = torch.cuda.get_device_capability(x.device)
            if capability < SCALED_MM_MIN_CAPABILITY:
                return f"torch._scaled_mm needs compute capability >= 8.9 (FP8 tensor cores); device has {capability[0]}.{capability[1]}"
            if module.in_features % SCALED_MM_CUDA_MULTIPLE or module.out_features % SCALED_MM_CUDA_MULTIPLE:
                return f"torch._scaled_mm on CUDA needs in/out features multiples of 16; layer is {module.in_features}x{module.out_features}"
        return None

    def prepare(self, module: nn.Module, device: torch.device) -> W8A8State:
        return prepare_state(module, device)

    def run(self, state: W8A8State, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return _run(state, x, bias)
