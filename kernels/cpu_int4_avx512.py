"""CPU decode path for 4-bit weights on AVX512-BF16 CPUs: our own W4A16 kernel (``csrc/w4a16_avx512bf16.c``).

Why a kernel of our own: at batch 1 PyTorch's ``_weight_int4pack_mm_for_cpu`` is bound by
arithmetic, not memory (it dequantizes every weight to fp32 and scales it before the multiply):
about 18 G weights/s on one AMD EPYC (AVX512-BF16) core, where the memory would feed 90. This kernel turns each
4-bit code into its exact bf16 value with a table lookup, multiplies pairs with ``vdpbf16ps``
(fp32 accumulation) and applies the scale once per group: 1.8-2.7x faster per layer at batch 1, measured in
benchmarks/cpu_kernels.py. It runs bf16 activations and up to 16 rows (decode); fp32/fp16
activations keep the int4pack operator, and prefill the dense path.

Numerics: products of codes and bf16 activations are exact in fp32; sums are fp32; the output is
rounded once to bf16. Asymmetric layers subtract ``scale * zero * sum(x over the group)`` in fp32,
which is ``(code - zero) * scale`` summed (the reference dequantizes the same way in fp32).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from compressor.kernels.cpu_int4 import cpu_decode_reason
from compressor.kernels.native_build import build_native, native_disabled
from compressor.kernels.packing import unpack_codes
from compressor.kernels.reference import unpack_zero_points

SOURCE = "w4a16_avx512bf16"
ROW_TILE = 64  # the kernel computes 64 output rows at a time; layers are zero-padded to it
# Every input row re-decodes the weight (the tile stays in L2), so the cost grows with the rows,
# but the int4pack operator's does too: ours measured 2.2-2.4x faster at 1 row (warm cache), 1.1-1.5x at
# 2-16 (AMD EPYC, one thread, 576x1536 and 4096x14336). Above 16 rows the dense path wins anyway.
MAX_ROWS = 16


@functools.cache
def _kernel() -> tuple[ctypes._CFuncPtr | None, str | None]:
    """The library's matmul entry point, or why it cannot run on this machine."""
    native = build_native(SOURCE)
    if native.library is None:
        return None, native.reason
    if not native.library.w4a16_cpu_supported():
        return None, "CPU lacks AVX512-BF16 (avx512f/bw/vl + avx512_bf16)"
    matmul = native.library.w4a16_matmul
    matmul.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_void_p, ctypes.c_int64]
    matmul.restype = ctypes.c_int
    return matmul, None


def kernel_unavailable() -> str | None:
    """Why this machine cannot run the kernel (None: it can); the switch is read on every call."""
    return native_disabled() or _kernel()[1]


def kernel_group(in_features: int, group_size: int | None) -> int:
    return in_features if group_size is None else group_size  # per-channel: one group spans the row


def pack_w4(codes: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit codes [N, K] (N a multiple of 64, K of 4) → the kernel's byte layout (see the C file)."""
    n, k = codes.shape
    unsigned = (codes.to(torch.int16) + 8).to(torch.uint8)
    # [tile, subtile t, row j, quad, column in quad] → [tile, quad, t, j, column in quad]
    tiled = unsigned.view(n // ROW_TILE, 4, 16, k // 4, 4).permute(0, 3, 1, 2, 4)
    return (tiled[..., 0:2] | (tiled[..., 2:4] << 4)).contiguous().view(-1)


@dataclass
class Avx512W4State:
    packed: torch.Tensor  # uint8, pack_w4 layout, rows padded to ROW_TILE
    scale: torch.Tensor  # fp32 [groups, N padded]
    zero_times_scale: torch.Tensor | None  # fp32 [groups, N padded]; asymmetric layers only
    group_size: int
    out_features: int
    padded_out: int
    # packed, scale, zero x scale (None: symmetric), read once: the state owns these tensors
    pointers: tuple[int, int, int | None] = field(init=False)

    def __post_init__(self) -> None:
        zs = self.zero_times_scale
        self.pointers = (self.packed.data_ptr(), self.scale.data_ptr(), None if zs is None else zs.data_ptr())


def repack_avx512(module: nn.Module) -> Avx512W4State:
    n, k = module.out_features, module.in_features
    group = kernel_group(k, module.group_size)
    padded = -(-n // ROW_TILE) * ROW_TILE
    codes = torch.zeros(padded, k, dtype=torch.int8)
    codes[:n] = unpack_codes(module.weight_packed, 4, (n, k), dim=1).cpu()
    scale = torch.zeros(k // group, padded, dtype=torch.float32)
    scale[:, :n] = module.weight_scale.float().cpu().t()
    zero_times_scale = None
    if module.weight_zero_point is not None:
        zero = unpack_zero_points(module.weight_zero_point, 4, n, module.groups).float().cpu()
        zero_times_scale = torch.zeros_like(scale)
        zero_times_scale[:, :n] = (zero * module.weight_scale.float().cpu()).t()
    return Avx512W4State(pack_w4(codes), scale.contiguous(), zero_times_scale, group, n, padded)


def _call_kernel(x: torch.Tensor, pointers: tuple, padded_out: int, group_size: int) -> torch.Tensor:
    matmul, reason = _kernel()
    if matmul is None:
        raise RuntimeError(reason)
    x = x.contiguous()
    k = x.shape[-1]
    out = torch.empty((*x.shape[:-1], padded_out), dtype=torch.bfloat16)
    status = matmul(x.data_ptr(), *pointers, x.numel() // k, padded_out, k, group_size, out.data_ptr(),
                    torch.get_num_threads())
    if status != 0:
        raise MemoryError("w4a16 kernel could not allocate its scratch")
    return out


def run_avx512(state: Avx512W4State, x: torch.Tensor) -> torch.Tensor:
    """x [..., K] bf16 → [..., N] bf16 (any leading shape: it saves QuantLinear two reshapes a call)."""
    out = _call_kernel(x, state.pointers, state.padded_out, state.group_size)
    return out if state.padded_out == state.out_features else out[..., : state.out_features]


def bind_avx512(state: Avx512W4State) -> Callable[[torch.Tensor], torch.Tensor]:
    """``run_avx512`` with the state's fields read once: the decode path (see bound_kernel.py).
    It repeats ``_call_kernel``'s few lines on purpose: at batch 1 each lookup saved is a
    measurable share of a SmolLM2 layer call."""
    matmul, reason = _kernel()
    if matmul is None:
        raise RuntimeError(reason)
    packed, scale, zero_times_scale = state.pointers
    padded, keep, group = state.padded_out, state.out_features, state.group_size
    empty, bf16, threads = torch.empty, torch.bfloat16, torch.get_num_threads

    def run(x: torch.Tensor, _owner: Avx512W4State = state) -> torch.Tensor:  # _owner keeps the pointers valid
        if not x.is_contiguous():
            x = x.contiguous()
        k = x.shape[-1]
        out = empty((*x.shape[:-1], padded), dtype=bf16)
        if matmul(x.data_ptr(), packed, scale, zero_times_scale, x.numel() // k, padded, k, group, out.data_ptr(), threads()):
            raise MemoryError("w4a16 kernel could not allocate its scratch")
        return out if padded == keep else out[..., :keep]

    return run


# The same kernel as a torch operator, for torch.compile: graphs cannot hold a ctypes call.
# Registered with a CPU kernel and a shape function only (no autograd: compiled graphs use it
# under no_grad), which costs ~3 us a call where torch.library.custom_op's wrapper costs ~11;
# eager decoding calls the kernel directly (bind_avx512).
_LIBRARY = torch.library.Library("compressor", "FRAGMENT")
_LIBRARY.define(
    "w4a16_avx512bf16(Tensor x, Tensor packed, Tensor scale, Tensor? zero_times_scale, int group_size, "
    "int out_features) -> Tensor"
)


def _w4a16_avx512bf16_cpu(x, packed, scale, zero_times_scale, group_size, out_features):
    zs = None if zero_times_scale is None else zero_times_scale.data_ptr()
    out = _call_kernel(x, (packed.data_ptr(), scale.data_ptr(), zs), scale.shape[1], group_size)
    return out[..., :out_features].contiguous() if scale.shape[1] != out_features else out


_LIBRARY.impl("w4a16_avx512bf16", _w4a16_avx512bf16_cpu, "CPU")


@torch.library.register_fake("compressor::w4a16_avx512bf16", lib=_LIBRARY)
def _w4a16_avx512bf16_fake(x, packed, scale, zero_times_scale, group_size, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


def run_avx512_traceable(state: Avx512W4State, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.compressor.w4a16_avx512bf16(
        x, state.packed, state.scale, state.zero_times_scale, state.group_size, state.out_features
    )


class CpuAvx512W4Backend:
    name = "cpu-w4a16-avx512bf16"
    takes_any_leading_shape = True  # run() keeps x's leading dimensions (see QuantLinear.forward)

    def __init__(self, max_rows: int = MAX_ROWS):
        self.max_rows = max_rows

    def unsupported(self, module: nn.Module, x: torch.Tensor) -> str | None:
        reason = cpu_decode_reason(module, x, 4, self.max_rows, "kernel")
        if reason is not None:
            return reason
        if x.dtype != torch.bfloat16:
            return f"takes bf16 activations, not {x.dtype}"
        group = kernel_group(module.in_features, module.group_size)
        if module.in_features % 4 or group % 4 or module.in_features % group:
            return f"needs the group size to divide the input width, both by 4; layer has {module.in_features} and {group}"
        return kernel_unavailable()

    def prepare(self, module: nn.Module, device: torch.device) -> Avx512W4State:
        return repack_avx512(module)

    def run(self, state: Avx512W4State, x: torch.Tensor) -> torch.Tensor:
        return run_avx512(state, x)

    def bind(self, state: Avx512W4State) -> Callable[[torch.Tensor], torch.Tensor]:
        return bind_avx512(state)

    def run_traceable(self, state: Avx512W4State, x: torch.Tensor) -> torch.Tensor:
        return run_avx512_traceable(state, x)


__all__ = ["CpuAvx512W4Backend", "Avx512W4State", "pack_w4", "repack_avx512", "run_avx512", "kernel_unavailable"]
