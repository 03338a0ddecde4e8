"""A layer's last kernel choice bound to its packed weight, for calls like the last one.

A decode token calls every layer with one row, and at that size QuantLinear's full dispatch
(pick a backend by device, dtype and batch size, find its packed form, check that form is not
stale) costs as much as the matmul itself: about 7 us a call, 1.5-2 ms of a 20 ms SmolLM2
token. A ``BoundKernel`` remembers the outcome for one situation (device, dtype, batch bucket,
no gradient) together with the buffers it was built from, so the next call in that situation
checks a few identities and versions and runs the kernel.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch

from compressor.kernels.buffer_snapshot import BufferSnapshot, all_fresh
from compressor.kernels.dispatch import KernelBackend, batch_bucket


def run_backend(backend: KernelBackend, state: Any, x: torch.Tensor, traceable: bool = False) -> torch.Tensor:
    """The backend's matmul of x [..., K] (no bias, no autograd) → [..., N]; `traceable`: its
    torch-operator form where it has one (``run_traceable``, for torch.compile)."""
    run = getattr(backend, "run_traceable", backend.run) if traceable else backend.run
    if getattr(backend, "takes_any_leading_shape", False):
        return run(state, x)  # saves two reshapes (~1 us each) a call
    out = run(state, x.reshape(-1, x.shape[-1]))
    return out.reshape(*x.shape[:-1], out.shape[-1])


@dataclass(frozen=True, eq=False)
class BoundKernel:
    run: Callable[[torch.Tensor], torch.Tensor]  # x [..., K] → [..., N], no bias
    device: torch.device
    dtype: torch.dtype
    numel_above: int  # the batch bucket in elements: numel_above < x.numel() <= numel_upto
    numel_upto: int
    sources: tuple[BufferSnapshot, ...]

    @classmethod
    def bind(cls, backend: KernelBackend, state: Any, x: torch.Tensor, width: int, sources: tuple[BufferSnapshot, ...]) -> "BoundKernel":
        """The backend's matmul bound for inputs in x's situation (`width`: the layer's input features)."""
        bind = getattr(backend, "bind", None)
        run = bind(state) if bind is not None else functools.partial(run_backend, backend, state)
        return cls.around(run, x, width, sources)

    @classmethod
    def around(cls, run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, width: int,
               sources: tuple[BufferSnapshot, ...]) -> "BoundKernel":
        """`run` kept for inputs in x's situation: its device and dtype, and its batch bucket."""
        bucket = batch_bucket(x.numel() // width)
        return cls(run, x.device, x.dtype, bucket // 2 * width, bucket * width, sources)

    def takes(self, x: torch.Tensor) -> bool:
        """Whether `x` is in the bound situation and the buffers are unchanged (no gradient
        wanted: an input that requires grad always takes the full path)."""
        if x.dtype is not self.dtype or x.requires_grad or not self.numel_above < x.numel() <= self.numel_upto:
            return False
        if x.device != self.device:
            return False
        if not all_fresh(self.sources):
            return False
        return True


__all__ = ["BoundKernel", "BufferSnapshot", "run_backend"]
