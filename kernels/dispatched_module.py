"""What QuantLinear, W8A8Linear and SparseLinear share: choosing a kernel backend per input
situation, caching each backend's prepared form of the layer, and reporting the choice.

A subclass says which registry it dispatches through (``kernel_registry``), what about an input
decides the choice (``kernel_situation``: device, dtype, batch bucket, ...) and which buffers
the kernels read (``KERNEL_BUFFERS``): a prepared form is rebuilt once one of them is replaced,
written or given new storage (``buffer_snapshot``). Moving or casting the module (``_apply``)
drops every cached choice and form.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compressor.kernels.buffer_snapshot import BufferSnapshot
from compressor.kernels.dispatch import KernelBackend, KernelChoice, KernelRegistry, prepared_form


class DispatchedModule(nn.Module):
    KERNEL_BUFFERS: tuple[str, ...] = ()  # the buffers kernels' prepared forms are built from

    def __init__(self) -> None:
        super().__init__()
        self._choices: dict[tuple, KernelChoice] = {}
        self._prepared: dict[tuple, tuple[tuple, Any]] = {}  # (backend, device) → (buffer snapshots, state)
        self.kernel_report: dict[str, Any] = {}

    # -- what a subclass provides ------------------------------------------------------------

    def kernel_registry(self) -> KernelRegistry:
        raise NotImplementedError

    def kernel_situation(self, x: torch.Tensor) -> tuple:
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------

    def choose_kernel(self, x: torch.Tensor) -> KernelChoice:
        """The backend for inputs like `x` (None: the reference path), chosen once per situation;
        ``kernel_report`` follows the latest choice."""
        key = self.kernel_situation(x)
        choice = self._choices.get(key)
        if choice is None:
            choice = self._choices[key] = self.kernel_registry().choose(self, x)
        if self.kernel_report.get("kernel") != choice.name:
            self.kernel_report = {"kernel": choice.name, "skipped": dict(choice.skipped)}
        return choice

    def prepared_state(self, backend: KernelBackend, device: torch.device) -> Any:
        """The backend's form of this layer for `device`, built on first use and rebuilt when the
        buffers change."""
        if torch.compiler.is_compiling():
            # Inside a traced graph the form is part of the graph; the cache's data-pointer key
            # cannot be traced.
            return backend.prepare(self, device)
        return prepared_form(self._prepared, backend, self, device, self.buffer_snapshot)

    def buffer_snapshot(self) -> tuple[BufferSnapshot, ...]:
        return BufferSnapshot.of(self, self.KERNEL_BUFFERS)

    def prepare_kernels(self, example: torch.Tensor) -> str:
        """Build what the kernel chosen for inputs like `example` needs (at load time)."""
        choice = self.choose_kernel(example)
        if choice.backend is not None:
            self.prepared_state(choice.backend, example.device)
        return choice.name

    def _apply(self, fn, recurse: bool = True):
        # Moving or casting the buffers invalidates every prepared form and choice.
        self._prepared.clear()
        self._choices.clear()
        return super()._apply(fn, recurse)
