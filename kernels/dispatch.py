"""Which kernel runs a QuantLinear: a registry of backends, tried in order of preference.

A backend says why it cannot run a layer (``unsupported`` returns a reason, or None when it
can), builds its own packed form of the weight once (``prepare``, at load time or on first
use), and runs the matmul (``run``: 2-D input → 2-D output, no bias). The reference path
(dequantize, then matmul) is the fallback, so every layer always runs. Optional: ``bind``
(state → a one-argument call with the state's fields read once, for decode: see
bound_kernel.py) and ``run_traceable`` (the matmul as a torch operator, for torch.compile;
needed where ``run`` leaves PyTorch, as a ctypes call does).

Each module kind has its registry here: ``quant_linear_kernels`` (packed int4/int8),
``w8a8_linear_kernels`` (W8A8 int8 / FP8) and ``sparse_linear_kernels`` (2:4 on CUDA through
``torch.sparse.to_sparse_semi_structured``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import nn

from compressor.kernels.buffer_snapshot import all_fresh

REFERENCE = "reference"


class KernelBackend(Protocol):
    name: str

    def unsupported(self, module: nn.Module, x: torch.Tensor) -> str | None:
        """Why this backend cannot run `module` on input `x` (None: it can)."""

    def prepare(self, module: nn.Module, device: torch.device) -> Any:
        """The backend's packed form of the module's weight (built once, cached on the module)."""

    def run(self, state: Any, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] → [M, out] (no bias)."""


@dataclass(frozen=True)
class KernelChoice:
    """The backend picked for one (device, dtype, batch bucket, grad) situation, and why others lost."""

    backend: KernelBackend | None  # None: the reference path
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return REFERENCE if self.backend is None else self.backend.name


class KernelRegistry:
    """An ordered, immutable list of backends."""

    def __init__(self, backends: list[KernelBackend]):
        self._backends = tuple(backends)

    @property
    def names(self) -> list[str]:
        return [b.name for b in self._backends]

    def choose(self, module: nn.Module, x: torch.Tensor) -> KernelChoice:
        skipped: dict[str, str] = {}
        for backend in self._backends:
            reason = backend.unsupported(module, x)
            if reason is None:
                return KernelChoice(backend, skipped)
            skipped[backend.name] = reason
        return KernelChoice(None, skipped)


def prepared_form(cache: dict[tuple, tuple[tuple, Any]], backend: KernelBackend, module: nn.Module,
                  device: torch.device, snapshot: Callable[[], tuple]) -> Any:
    """The backend's form of `module` for `device`, from `cache` ((backend, device) → (buffer
    snapshots, form)); built on first use and again once a buffer it was built from has changed.
    `snapshot` takes the module's ``buffer_snapshot.BufferSnapshot``s."""
    slot = (backend.name, device)
    cached = cache.get(slot)
    if cached is None or not all_fresh(cached[0]):
        with torch.no_grad():
            cached = cache[slot] = (snapshot(), backend.prepare(module, device))
    return cached[1]


def batch_bucket(rows: int) -> int:
    """Inputs are grouped by rows rounded up to a power of two, so choices are cached per bucket."""
    return 1 << max(rows - 1, 0).bit_length()


@functools.cache
def quant_linear_kernels() -> KernelRegistry:
    """QuantLinear's backends, fastest first. The reference path is the implicit last one."""
    from compressor.kernels.cpu_int4 import CpuInt4PackBackend
    from compressor.kernels.cpu_int4_avx512 import CpuAvx512W4Backend
    from compressor.kernels.cpu_int8 import CpuInt8PackBackend
    from compressor.kernels.triton_backend import TritonWxA16Backend

    # Our AVX512-BF16 kernel before PyTorch's int4 operator: it takes bf16 decode inputs only
    # and says why not otherwise, so fp32/fp16 and longer inputs still reach the operator.
    return KernelRegistry([TritonWxA16Backend(), CpuAvx512W4Backend(), CpuInt4PackBackend(), CpuInt8PackBackend()])


@functools.cache
def w8a8_linear_kernels() -> KernelRegistry:
    """W8A8Linear's backends (int8 and FP8 codes × codes). The reference path is the implicit last one."""
    from compressor.kernels.w8a8_backends import Fp8ScaledMmBackend, Int8IntMmBackend

    return KernelRegistry([Int8IntMmBackend(), Fp8ScaledMmBackend()])


@functools.cache
def sparse_linear_kernels() -> KernelRegistry:
    """SparseLinear's backends. The reference path (rebuild the dense weight) is the implicit last one."""
    from compressor.kernels.sparse24_backend import Semi24CudaBackend

    return KernelRegistry([Semi24CudaBackend()])
