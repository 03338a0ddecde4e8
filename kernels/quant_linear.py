"""QuantLinear: a Linear whose weight is stored as packed integer codes.

Buffers carry exactly the tensors of the compressed-tensors ``pack-quantized`` format
(``weight_packed``, ``weight_scale``, ``weight_zero_point``, ``weight_shape``), so a model
holding these modules saves straight to that format and loads back without conversion.

``forward`` dispatches by device, dtype and batch size to the first backend of
``compressor.kernels.dispatch.quant_linear_kernels()`` that can run the layer (Triton on
CUDA, PyTorch's packed int4/int8 operators on CPU), else to the reference path: dequantize
the weight, then matmul. Each backend's packed form is built once per device and cached on
the module (rebuilt if the buffers change); ``kernel_report`` records the last choice and why
the other backends were skipped. The last no-grad choice is kept bound to its packed form
(``bound_kernel.BoundKernel``), so decode calls skip the dispatch. Every path is differentiable
with respect to the input (the codes are frozen buffers): the backward pass multiplies by the
dequantized weight. Under ``torch.compile`` the kernel fixed by ``plan_for_compile`` runs as a
torch operator, so the model compiles to one graph.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compressor.kernels.bound_kernel import BoundKernel, run_backend
from compressor.kernels.dispatch import KernelBackend, KernelRegistry, batch_bucket, quant_linear_kernels
from compressor.kernels.dispatched_module import DispatchedModule
from compressor.kernels.packing import pack_codes, unpack_codes
from compressor.kernels.reference import dequantize_packed, unpack_zero_points


class _PackedKernelLinear(torch.autograd.Function):
    """A backend's matmul with a backward through the reference dequantized weight."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, module: "QuantLinear", backend: KernelBackend, state: Any) -> torch.Tensor:
        ctx.module = module
        return backend.run(state, x2d)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.module.dequantized_weight(grad.dtype), None, None, None


class QuantLinear(DispatchedModule):
    KERNEL_BUFFERS = ("weight_packed", "weight_scale", "weight_zero_point")

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
        # How the scales were found (compressor.formats.WeightCalibration), for the saved config only.
        self.weight_calibration: Any = None
        self.compile_plan: tuple | None = None  # (backend, state, rows, dtype, device): plan_for_compile
        self._bound: BoundKernel | None = None  # the last no-grad kernel choice, for calls like it

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
        return unpack_zero_points(self.weight_zero_point, self.bits, self.out_features, self.groups)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as floats: (codes - zero) * scale, group by group."""
        return dequantize_packed(
            self.weight_packed, self.weight_scale, self.weight_zero_point, self.bits, self.in_features, dtype
        )

    # -- dispatch -------------------------------------------------------------------------

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def kernel_registry(self) -> KernelRegistry:
        return quant_linear_kernels()

    def kernel_situation(self, x: torch.Tensor) -> tuple:
        rows = x.numel() // self.in_features if self.in_features else 0
        return (x.device.type, x.dtype, batch_bucket(rows), torch.is_grad_enabled() and x.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._traced_forward(x)
        bound = self._bound
        if bound is None or not bound.takes(x):
            bound = self._bind(x)
            if bound is None:
                return self._unbound_forward(x)
        out = bound.run(x)
        bias = self._parameters.get("bias")  # not self.bias: Module.__getattr__ costs ~1 us a call
        return out if bias is None else out + bias

    def _bind(self, x: torch.Tensor) -> BoundKernel | None:
        """Dispatch `x` in full; for a no-grad kernel call, remember the outcome (None otherwise)."""
        choice = self.choose_kernel(x)
        if choice.backend is None or (torch.is_grad_enabled() and x.requires_grad):
            return None
        state = self.prepared_state(choice.backend, x.device)
        self._bound = BoundKernel.bind(choice.backend, state, x, self.in_features, self.buffer_snapshot())
        return self._bound

    def _unbound_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reference path, or a kernel with a backward through the dequantized weight."""
        choice = self.choose_kernel(x)
        if choice.backend is None:
            return self.reference_forward(x)
        state = self.prepared_state(choice.backend, x.device)
        out = _PackedKernelLinear.apply(x.reshape(-1, self.in_features), self, choice.backend, state)
        out = out.reshape(*x.shape[:-1], self.out_features)
        bias = self._parameters.get("bias")
        return out if bias is None else out + bias

    def plan_for_compile(self, example: torch.Tensor) -> str:
        """Fix the kernel and packed form a compiled graph will use for inputs like `example`.

        A graph cannot hold ``forward``'s caches (keyed by data pointers) or a ctypes call, so
        the choice is made here, before tracing, and the backend's traceable form runs
        (``run_traceable``, a torch operator, where the backend has one). Larger inputs and
        inputs of another dtype or device or that need a gradient take the reference path in the
        graph. The plan holds the packed form as of now: plan (and compile) again after changing
        the weights."""
        choice = self.choose_kernel(example)
        self.compile_plan = None
        if choice.backend is not None:
            state = self.prepared_state(choice.backend, example.device)
            rows = example.numel() // self.in_features
            self.compile_plan = (choice.backend, state, rows, example.dtype, example.device)
        return choice.name

    def _traced_forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.compile_plan
        if (
            plan is None
            or x.numel() // self.in_features > plan[2]
            or x.dtype != plan[3]
            or x.device != plan[4]
            or (torch.is_grad_enabled() and x.requires_grad)
        ):
            return self.reference_forward(x)
        out = run_backend(plan[0], plan[1], x, traceable=True)
        bias = self.bias
        return out if bias is None else out + bias

    def __getstate__(self) -> dict[str, Any]:
        # The bound call closes over native pointers: not picklable, and a copy must bind its own.
        return {**self.__dict__, "_bound": None}

    def _apply(self, fn, recurse: bool = True):
        # Moving or casting the buffers invalidates the compile plan and bound call too.
        self.compile_plan = None
        self._bound = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        group = "channel" if self.group_size is None else f"group={self.group_size}"
        sym = "sym" if self.symmetric else "asym"
        return f"in={self.in_features}, out={self.out_features}, w{self.bits} {group} {sym}"
