"""Which tensors a layer's prepared kernel form was built from, and whether they still hold.

A kernel backend's form of a layer (a repacked weight, pointers bound into a native call) is
only valid while the layer's buffers are the ones it was built from. A snapshot notes, per
buffer, the tensor object, its version counter and its data pointer: the buffer replaced
(``load_state_dict(assign=True)``, ``module._buffers[name] = ...``), written in place
(``copy_``, which bumps ``_version``) or given new storage (``buffer.data = ...``, which keeps
the object and its version) all make it stale. Holding the tensor also keeps its memory from
being reused by a replacement at the same address, which a pointer-only key could mistake for
the original.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class BufferSnapshot:
    """One buffer as the packed form saw it: replaced (load_state_dict), written in place
    (copy_, which bumps ``_version``) or given other storage (``buffer.data = ...``, which
    keeps the tensor object and its version) since then means stale."""

    owner: dict[str, torch.Tensor]  # the module's ``_buffers``
    name: str
    tensor: torch.Tensor
    version: int
    data_ptr: int

    @classmethod
    def of(cls, module: torch.nn.Module, names: tuple[str, ...]) -> tuple["BufferSnapshot", ...]:
        buffers = module._buffers
        return tuple(cls(buffers, n, buffers[n], buffers[n]._version, buffers[n].data_ptr())
                     for n in names if buffers.get(n) is not None)

    def fresh(self) -> bool:
        tensor = self.tensor
        return self.owner.get(self.name) is tensor and tensor._version == self.version and tensor.data_ptr() == self.data_ptr


def all_fresh(snapshots: tuple[BufferSnapshot, ...]) -> bool:
    for snapshot in snapshots:
        if not snapshot.fresh():
            return False
    return True
