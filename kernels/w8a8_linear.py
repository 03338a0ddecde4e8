"""W8A8Linear: 8-bit weights per output channel, 8-bit activations (int8 or FP8 e4m3).

Buffers carry exactly the tensors of the compressed-tensors ``int-quantized`` /
``float-quantized`` formats: ``weight`` (int8 or float8_e4m3fn, [out, in]), ``weight_scale``
([out, 1]) and, for static activations, ``input_scale`` ([1]). A model holding these modules
saves straight to that format, which transformers and vLLM read as W8A8 / FP8.

Activations are quantized in ``forward``, symmetric, either dynamically (one scale per token,
computed from the token's own maximum) or statically (one calibrated scale for the tensor).
With ``activations=None`` the layer is weight-only (FP8 W8A16).

Compute paths (``forward`` dispatches by device, dtype and batch size to the first backend of
``compressor.kernels.dispatch.w8a8_linear_kernels()`` that can run the layer, else the
reference path; ``kernel_report`` records the choice and why the others were skipped):
- int8 × int8: ``torch._int_mm`` (exact int32 accumulation), then both scales (CPU and CUDA);
- FP8 × FP8: ``torch._scaled_mm`` with row-wise scales (CUDA with capability ≥ 8.9; on CPU it
  is slower than the reference path, which the default registry therefore keeps there);
- reference: the input's codes times their scale, times the dequantized weight, in fp32.
Every path is differentiable with respect to the input (frozen codes): the activation
quantization is passed straight through and the gradient multiplies by the dequantized weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from compressor.kernels.dispatch import KernelRegistry, batch_bucket, w8a8_linear_kernels
from compressor.kernels.dispatched_module import DispatchedModule

QuantType = Literal["int", "float"]
INT8_MAX = 127.0


def float8_dtype() -> torch.dtype:
    return torch.float8_e4m3fn


def float8_max() -> float:
    return float(torch.finfo(float8_dtype()).max)


def type_max(kind: QuantType) -> float:
    """The largest code magnitude of an 8-bit grid: 127 for int8, 448 for FP8 e4m3."""
    return INT8_MAX if kind == "int" else float8_max()


def to_codes(values: torch.Tensor, kind: QuantType) -> torch.Tensor:
    """Scaled float values → 8-bit codes (int8 by rounding, FP8 by casting), saturating."""
    limit = type_max(kind)
    if kind == "int":
        return torch.round(values).clamp(-limit - 1, limit).to(torch.int8)
    return values.clamp(-limit, limit).to(float8_dtype())


@dataclass(frozen=True)
class ActivationScheme:
    """How a W8A8Linear quantizes its input."""

    type: QuantType = "int"
    dynamic: bool = True  # True: one scale per token at run time; False: the calibrated input_scale


def quantize_per_token(x: torch.Tensor, kind: QuantType) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of `x` [..., K] with one symmetric scale per row; scales are [..., 1] float32."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / type_max(kind)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return to_codes(xf / scale, kind), scale


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor, kind: QuantType) -> torch.Tensor:
    return to_codes(x.float() / scale.float(), kind)


class W8A8Linear(DispatchedModule):
    KERNEL_BUFFERS = ("weight", "weight_scale", "input_scale")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        weight_type: QuantType,
        activations: ActivationScheme | None,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_type = weight_type
        self.activations = activations
        code_dtype = torch.int8 if weight_type == "int" else float8_dtype()
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=code_dtype, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=dtype, device=device))
        if activations is not None and not activations.dynamic:
            self.register_buffer("input_scale", torch.ones(1, dtype=dtype, device=device))
        else:
            self.input_scale = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        # How the scales were found (compressor.formats.WeightCalibration), for the saved config only.
        self.weight_calibration: Any = None

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        *,
        weight_type: QuantType,
        activations: ActivationScheme | None,
        input_scale: torch.Tensor | None,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> "W8A8Linear":
        out_features, in_features = codes.shape
        module = cls(
            in_features, out_features, weight_type=weight_type, activations=activations,
            bias=bias is not None, dtype=dtype, device=codes.device,
        )
        module.weight.copy_(codes)
        module.weight_scale.copy_(scale.reshape(out_features, 1).to(dtype))
        if module.input_scale is not None:
            if input_scale is None:
                raise ValueError("static activations need an input_scale")
            module.input_scale.copy_(input_scale.reshape(1).to(dtype))
        if bias is not None:
            module.bias.data.copy_(bias.detach().to(dtype))
        return module

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        weight = self.weight.float() * self.weight_scale.float()
        return weight.to(dtype or self.weight_scale.dtype)

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The input's codes and their scale (per token [..., 1], or the static [1])."""
        assert self.activations is not None
        if self.activations.dynamic:
            return quantize_per_token(x, self.activations.type)
        scale = self.input_scale.float()
        return quantize_per_tensor(x, scale, self.activations.type), scale

    # -- dispatch -------------------------------------------------------------------------

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize, then matmul: the input's codes × their scale against the dequantized weight, in fp32."""
        if self.activations is None:
            return F.linear(x, self.dequantized_weight(x.dtype), self.bias)
        codes, x_scale = self.quantize_input(x)
        xf = x.float()
        # Straight-through: the value is the quantized input, the gradient that of the identity.
        quantized = xf + (codes.float() * x_scale - xf).detach()
        bias = None if self.bias is None else self.bias.float()
        return F.linear(quantized, self.dequantized_weight(torch.float32), bias).to(x.dtype)

    def kernel_registry(self) -> KernelRegistry:
        return w8a8_linear_kernels()

    def kernel_situation(self, x: torch.Tensor) -> tuple:
        rows = x.numel() // self.in_features if self.in_features else 0
        return (x.device.type, x.dtype, batch_bucket(rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        choice = self.choose_kernel(x)
        if choice.backend is None:
            return self.reference_forward(x)
        state = self.prepared_state(choice.backend, x.device)
        out = choice.backend.run(state, x.reshape(-1, self.in_features), self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        weights = "w8 int" if self.weight_type == "int" else "w8 fp8-e4m3"
        if self.activations is None:
            acts = "a16"
        else:
            acts = f"a8 {self.activations.type} {'dynamic per-token' if self.activations.dynamic else 'static per-tensor'}"
        return f"in={self.in_features}, out={self.out_features}, {weights} per-channel, {acts}"


def build_from_scheme(linear: nn.Linear, scheme: dict, dtype: torch.dtype) -> W8A8Linear:
    """An empty W8A8Linear shaped like `linear` for a compressed-tensors config group (as a dict)
    of format int-quantized / float-quantized; load the checkpoint's tensors into it afterwards.
    This is the builder `compressor.load` registers for those two formats."""
    weights = scheme["weights"]
    inputs = scheme.get("input_activations")
    if weights.get("num_bits") != 8 or weights.get("strategy") != "channel":
        raise ValueError(f"W8A8Linear holds 8-bit per-channel weights, not {weights}")
    activations = None
    if inputs is not None:
        activations = ActivationScheme(type=inputs["type"], dynamic=bool(inputs.get("dynamic", False)))
    return W8A8Linear(
        linear.in_features, linear.out_features, weight_type=weights["type"], activations=activations,
        bias=linear.bias is not None, dtype=dtype, device=linear.weight.device,
    )
