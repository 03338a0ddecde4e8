"""SparseLinear backend for CUDA: 2:4 weights as ``torch.sparse.to_sparse_semi_structured``.

A layer qualifies when every group of 4 consecutive input columns keeps at most 2 weights (what
a ``"2:4"`` prune stage leaves), its shape is a multiple of the sparse kernels' tile (32 rows x
64 columns for fp16/bf16, the stricter of PyTorch's CUTLASS and cuSPARSELt constraints) and the
GPU has sparse tensor cores (compute capability 8.0 or later). ``prepare`` compresses the dense
weight once per device (values + 2-bit metadata, chosen by PyTorch: cuSPARSELt where it is
built in, else CUTLASS); ``run`` is ``F.linear`` against it. Inputs that need a gradient take the
reference path (the semi-structured tensor's backward is not relied on).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

DTYPES = (torch.float16, torch.bfloat16)
TILE_ROWS, TILE_COLUMNS = 32, 64


@functools.cache
def _capability_ok(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 0)


class Semi24CudaBackend:
    name = "cuda-sparse24"

    def unsupported(self, module: nn.Module, x: torch.Tensor) -> str | None:
        if x.device.type != "cuda":
            return "needs a CUDA device"
        if x.dtype not in DTYPES:
            return f"takes fp16/bf16 activations, not {x.dtype}"
        if torch.is_grad_enabled() and x.requires_grad:
            return "input needs a gradient: the dense path runs"
        if module.out_features % TILE_ROWS or module.in_features % TILE_COLUMNS:
            return f"needs out x in a multiple of {TILE_ROWS} x {TILE_COLUMNS}; layer is {module.out_features} x {module.in_features}"
        if not module.two_of_four():
            return "weight is not 2:4 (some group of 4 columns keeps more than 2)"
        if not _capability_ok(x.device.index or 0):
            return "needs compute capability 8.0 or later (sparse tensor cores)"
        return None

    def prepare(self, module: nn.Module, device: torch.device):
        from torch.sparse import to_sparse_semi_structured

        dtype = module.weight_values.dtype if module.weight_values.dtype in DTYPES else torch.float16
        return to_sparse_semi_structured(module.dense_weight(dtype).to(device).contiguous())

    def run(self, state, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(state.dtype), state).to(x.dtype)


__all__ = ["Semi24CudaBackend"]
