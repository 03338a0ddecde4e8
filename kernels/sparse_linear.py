"""SparseLinear: a Linear whose weight is stored as a bitmask plus its non-zero values.

Buffers (the on-disk ``sparse-bitmask`` layout of ``compressor.sparse_format``):
- ``weight_bitmask`` uint8 [out, ceil(in / 8)]: bit ``c % 8`` of byte ``c // 8`` of a row is
  set when column ``c`` of that row is non-zero (least significant bit first);
- ``weight_values`` [nnz] in the weight's dtype: the non-zeros in row-major order;
- ``weight_shape`` int64 [2]: (out_features, in_features).

Its state dict also holds an empty ``weight`` (0 elements), dropped again on load: plain
transformers, which cannot decompress the layout, then refuses the checkpoint with a size
mismatch for that layer instead of silently leaving it at random initial values.

``forward`` runs the first backend of ``dispatch.sparse_linear_kernels()`` that can take the
input (2:4 weights on a CUDA GPU with sparse tensor cores: ``torch.sparse.to_sparse_semi_structured``,
built once per device and rebuilt when the buffers change), else the reference path: rebuild the
dense weight, then matmul. ``kernel_report`` says which ran and why the others were skipped. At
50 % sparsity in bf16 the layout takes 9/16 of the dense bytes (1 byte of values + 1/8 byte of
mask per weight).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compressor.kernels.buffer_snapshot import all_fresh
from compressor.kernels.dispatch import KernelRegistry, sparse_linear_kernels
from compressor.kernels.dispatched_module import DispatchedModule

_BITS = torch.arange(8, dtype=torch.uint8)


def pack_bitmask(keep: torch.Tensor) -> torch.Tensor:
    """Bool [rows, columns] → uint8 [rows, ceil(columns / 8)], least significant bit first."""
    rows, columns = keep.shape
    padded = torch.zeros(rows, -(-columns // 8) * 8, dtype=torch.uint8, device=keep.device)
    padded[:, :columns] = keep.to(torch.uint8)
    weights = (1 << _BITS.to(keep.device)).to(torch.uint8)
    return (padded.reshape(rows, -1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bitmask(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """Inverse of `pack_bitmask`."""
    bits = (packed.unsqueeze(-1) >> _BITS.to(packed.device)) & 1
    return bits.reshape(packed.shape[0], -1)[:, :columns].bool()


def _add_weight_placeholder(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    state_dict[f"{prefix}weight"] = torch.empty(0, dtype=module.weight_values.dtype)


def _drop_weight_placeholder(module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    placeholder = state_dict.get(f"{prefix}weight")
    if placeholder is not None and placeholder.numel() == 0:
        del state_dict[f"{prefix}weight"]


class SparseLinear(DispatchedModule):
    KERNEL_BUFFERS = ("weight_bitmask", "weight_values")

    def __init__(self, in_features: int, out_features: int, nnz: int, *, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight_bitmask", torch.zeros(out_features, -(-in_features // 8), dtype=torch.uint8, device=device))
        self.register_buffer("weight_values", torch.zeros(nnz, dtype=dtype, device=device))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self._two_of_four: tuple[tuple, bool] | None = None  # (buffer snapshots, answer)
        self.register_state_dict_post_hook(_add_weight_placeholder)
        self.register_load_state_dict_pre_hook(_drop_weight_placeholder)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "SparseLinear":
        out_features, in_features = weight.shape
        keep = weight != 0
        module = cls(in_features, out_features, int(keep.sum()), bias=bias is not None, dtype=weight.dtype, device=weight.device)
        module.weight_bitmask.copy_(pack_bitmask(keep))
        module.weight_values.copy_(weight[keep])
        if bias is not None:
            module.bias.data.copy_(bias.detach().to(weight.dtype))
        return module

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "SparseLinear":
        """Build from a layer's saved tensors (local names: weight_bitmask, weight_values, weight_shape, bias)."""
        out_features, in_features = (int(v) for v in tensors["weight_shape"].tolist())
        values = tensors["weight_values"]
        module = cls(in_features, out_features, values.numel(), bias="bias" in tensors, dtype=values.dtype, device=values.device)
        module.weight_bitmask.copy_(tensors["weight_bitmask"])
        module.weight_values.copy_(values)
        if "bias" in tensors:
            module.bias.data.copy_(tensors["bias"])
        return module

    @property
    def nnz(self) -> int:
        return self.weight_values.numel()

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        keep = unpack_bitmask(self.weight_bitmask, self.in_features)
        weight = torch.zeros(self.out_features, self.in_features, dtype=self.weight_values.dtype, device=keep.device)
        weight[keep] = self.weight_values
        return weight.to(dtype or self.weight_values.dtype)

    def two_of_four(self) -> bool:
        """Whether every group of 4 consecutive columns of every row keeps at most 2 weights
        (what a "2:4" prune stage leaves); computed once per state of the buffers."""
        if self._two_of_four is None or not all_fresh(self._two_of_four[0]):
            fits = self.in_features % 4 == 0
            if fits:
                keep = unpack_bitmask(self.weight_bitmask, self.in_features)
                fits = bool((keep.reshape(self.out_features, -1, 4).sum(-1) <= 2).all())
            self._two_of_four = (self.buffer_snapshot(), fits)
        return self._two_of_four[1]

    def kernel_registry(self) -> KernelRegistry:
        return sparse_linear_kernels()

    def kernel_situation(self, x: torch.Tensor) -> tuple:
        return (x.device.type, x.dtype, torch.is_grad_enabled() and x.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        choice = self.choose_kernel(x)
        if choice.backend is None:
            return F.linear(x, self.dense_weight(x.dtype), self.bias)
        form = self.prepared_state(choice.backend, x.device)
        out = choice.backend.run(form, x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        density = self.nnz / max(self.in_features * self.out_features, 1)
        return f"in={self.in_features}, out={self.out_features}, density={density:.3f}"


def build_sparse_linear(prefix: str, tensors: dict[str, torch.Tensor]) -> SparseLinear:
    """Builder for `compressor.load`'s format registry: the module named `prefix` from a
    checkpoint's flat tensor dict (``{prefix}.weight_bitmask``, ...)."""
    local = {key[len(prefix) + 1 :]: value for key, value in tensors.items() if key.startswith(prefix + ".")}
    return SparseLinear.from_tensors(local)
