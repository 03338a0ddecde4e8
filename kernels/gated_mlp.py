"""A W4 gated MLP, ``down(silu(gate(x)) * up(x))``, in one native call at decode time.

At batch 1 a SmolLM2 MLP is five small steps from Python: three layer calls, the activation and
the product, each with its own dispatch and output tensor. ``w4a16_gated_mlp`` (in
``csrc/w4a16_avx512bf16.c``) runs them in one parallel region: gate and up tiles share the input
row, ``silu(g) * u`` is taken in fp32 and rounded once to bf16, then the down tiles read it.

Installed by ``compressor.load`` on MLPs that pass ``install_fused_mlps``'s check: three
QuantLinear children named gate_proj / up_proj / down_proj, all taking our AVX512 kernel for a
one-row bf16 input, an intermediate width that is a multiple of 64, and a forward that equals the
gated formula on a random input (so another activation or another shape is left alone). The
MLP's own forward stays underneath: inputs that need a gradient, larger inputs, another dtype or
device, or changed weights fall back to it; the module, its class and its state dict are unchanged
(the fused call is installed as the instance's ``forward``, as accelerate's hooks do).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any, Callable

import torch
from torch import nn

from compressor.kernels.bound_kernel import BoundKernel
from compressor.kernels.cpu_int4_avx512 import Avx512W4State, CpuAvx512W4Backend, kernel_unavailable
from compressor.kernels.native_build import build_native
from compressor.kernels.quant_linear import QuantLinear

LAYERS = ("gate_proj", "up_proj", "down_proj")
AGREEMENT = 2e-2  # bf16: the plain forward rounds g, u, silu(g) and the product to bf16; we round once


@functools.cache
def _gated_mlp_function() -> Callable[..., int]:
    function = build_native("w4a16_avx512bf16").library.w4a16_gated_mlp
    pointer, integer = ctypes.c_void_p, ctypes.c_int64
    function.argtypes = [pointer] + [integer] * 4 + [pointer] * 6 + [integer] + [pointer] * 3 + [integer, pointer, pointer, integer]
    function.restype = ctypes.c_int
    return function


def bind_gated_mlp(gate: Avx512W4State, up: Avx512W4State, down: Avx512W4State) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [..., K] bf16 → [..., N] bf16 through the fused call, with the states' fields read once."""
    call = _gated_mlp_function()
    width, padded_out, keep = gate.padded_out, down.padded_out, down.out_features
    fixed = (*gate.pointers, *up.pointers, gate.group_size, *down.pointers, down.group_size)
    empty, bf16, threads = torch.empty, torch.bfloat16, torch.get_num_threads

    def run(x: torch.Tensor, _owners: tuple = (gate, up, down)) -> torch.Tensor:  # _owners keep the pointers valid
        if not x.is_contiguous():
            x = x.contiguous()
        k = x.shape[-1]
        rows = x.numel() // k
        hidden = empty((rows, width), dtype=bf16)
        out = empty((*x.shape[:-1], padded_out), dtype=bf16)
        if call(x.data_ptr(), rows, k, width, padded_out, *fixed, hidden.data_ptr(), out.data_ptr(), threads()):
            raise MemoryError("w4a16 gated MLP could not allocate its scratch")
        return out if padded_out == keep else out[..., :keep]

    return run


class FusedGatedMlpForward:
    """The forward installed on one MLP: the fused call when it applies, the MLP's own otherwise."""

    def __init__(self, mlp: nn.Module):
        self.mlp = mlp
        self.bound: BoundKernel | None = None

    def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        return type(self.mlp).forward(self.mlp, x)

    def __getstate__(self) -> dict[str, Any]:
        # The bound call closes over native pointers: not picklable, and a copy must bind its own.
        return {"mlp": self.mlp, "bound": None}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self.plain_forward(x)  # a graph holds the layers' planned operators instead
        if self._layers_hooked():
            return self.plain_forward(x)  # the fused call would skip them (e.g. an adapter attached after load)
        bound = self.bound
        if bound is None or not bound.takes(x):
            bound = self._bind(x)
            if bound is None:
                return self.plain_forward(x)
        return bound.run(x)

    def _layers_hooked(self) -> bool:
        modules = self.mlp._modules
        return any(modules[name]._forward_hooks or modules[name]._forward_pre_hooks for name in LAYERS)

    def _bind(self, x: torch.Tensor) -> BoundKernel | None:
        layers = [getattr(self.mlp, name) for name in LAYERS]
        if not all(isinstance(layer, QuantLinear) for layer in layers):
            return None
        if torch.is_grad_enabled() and x.requires_grad:
            return None
        gate, up, down = layers
        hidden = x.new_empty((*x.shape[:-1], gate.out_features))
        choices = [gate.choose_kernel(x), up.choose_kernel(x), down.choose_kernel(hidden)]
        if any(choice.name != CpuAvx512W4Backend.name for choice in choices):
            return None
        states = [layer.prepared_state(choice.backend, x.device) for layer, choice in zip(layers, choices)]
        for layer, choice in zip(layers, choices):
            layer.kernel_report = {"kernel": choice.name, "skipped": dict(choice.skipped), "fused": "gated MLP call"}
        sources = tuple(snapshot for layer in layers for snapshot in layer.buffer_snapshot())
        self.bound = BoundKernel.around(bind_gated_mlp(*states), x, gate.in_features, sources)
        return self.bound


def _eligible(mlp: nn.Module) -> bool:
    layers = [getattr(mlp, name, None) for name in LAYERS]
    if not all(isinstance(layer, QuantLinear) for layer in layers) or not hasattr(mlp, "act_fn"):
        return False
    gate, up, down = layers
    return (
        gate.in_features == up.in_features
        and gate.out_features == up.out_features == down.in_features
        and gate.out_features % 64 == 0
    )


def _agrees(fused: FusedGatedMlpForward, example: torch.Tensor) -> bool:
    with torch.no_grad():
        expected = fused.plain_forward(example).double()
        actual = fused(example)
    if fused.bound is None:
        return False
    return ((actual.double() - expected).norm() / expected.norm().clamp(min=1e-30)).item() <= AGREEMENT


def install_fused_mlps(model: nn.Module, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Install the fused decode call on every MLP that passes the check; returns their names."""
    if device.type != "cpu" or dtype != torch.bfloat16 or kernel_unavailable() is not None:
        return []
    installed = []
    generator = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        if not _eligible(module) or "forward" in module.__dict__:
            continue
        fused = FusedGatedMlpForward(module)
        example = torch.randn(1, 1, module.gate_proj.in_features, generator=generator).to(dtype)
        if _agrees(fused, example):
            module.forward = fused
            installed.append(name)
    return installed


def remove_fused_mlps(model: nn.Module) -> None:
    """Give every MLP its own forward back (a dense copy must run as plain transformers)."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), FusedGatedMlpForward):
            del module.__dict__["forward"]


__all__ = ["FusedGatedMlpForward", "bind_gated_mlp", "install_fused_mlps", "remove_fused_mlps"]
