"""Low-rank modules: a compensation term added to a layer's output, and a factorized Linear.

``LowRankCompensation`` holds ``A`` (r×in) and ``B`` (out×r) and is attached as a child named
``lowrank`` of the layer it corrects (a QuantLinear or a Linear), with a forward hook that adds
``x @ Aᵀ @ Bᵀ`` to the layer's output. The factors are non-persistent buffers: the layer's own
tensors and names stay exactly those of the compressed-tensors format, so ``save_pretrained``
writes a standard checkpoint and the factors travel separately as a peft adapter
(``compressor.adapters``).

``FactorizedLinear`` replaces a Linear by ``B @ A`` (two smaller matmuls). Its state dict
shows the dense product under ``weight``, so a saved checkpoint is one plain transformers
loads; the factors themselves are written next to it (``compressor.adapters``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

COMPENSATION_CHILD = "lowrank"


class LowRankCompensation(nn.Module):
    """``x ↦ x @ Aᵀ @ Bᵀ``: a rank-r term added to a layer's output."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, origin: str):
        super().__init__()
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"A is {tuple(a.shape)} and B is {tuple(b.shape)}: ranks differ")
        self.register_buffer("A", a.detach().contiguous(), persistent=False)
        self.register_buffer("B", b.detach().contiguous(), persistent=False)
        self.origins = [origin]

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x.to(self.A.dtype), self.A), self.B).to(x.dtype)

    def extend(self, a: torch.Tensor, b: torch.Tensor, origin: str) -> None:
        """Add a second rank-r term (e.g. LoRA after EoRA): the ranks stack."""
        self.A = torch.cat([self.A, a.to(self.A.dtype)], dim=0)
        self.B = torch.cat([self.B, b.to(self.B.dtype)], dim=1)
        self.origins.append(origin)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, from={'+'.join(self.origins)}"


def _add_compensation(module: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor:
    return output + getattr(module, COMPENSATION_CHILD)(_inputs[0])


def attach_compensation(layer: nn.Module, a: torch.Tensor, b: torch.Tensor, origin: str) -> LowRankCompensation:
    """Make `layer` return ``layer(x) + x Aᵀ Bᵀ``; a second call stacks the ranks."""
    existing = getattr(layer, COMPENSATION_CHILD, None)
    if isinstance(existing, LowRankCompensation):
        existing.extend(a, b, origin)
        return existing
    compensation = LowRankCompensation(a, b, origin)
    setattr(layer, COMPENSATION_CHILD, compensation)
    layer._lowrank_hook = layer.register_forward_hook(_add_compensation)
    return compensation


def detach_compensation(layer: nn.Module) -> LowRankCompensation | None:
    compensation = getattr(layer, COMPENSATION_CHILD, None)
    if not isinstance(compensation, LowRankCompensation):
        return None
    layer._lowrank_hook.remove()
    del layer._lowrank_hook
    delattr(layer, COMPENSATION_CHILD)
    return compensation


def compensations(model: nn.Module) -> dict[str, LowRankCompensation]:
    """Layer name → its compensation, for every compensated layer of `model`."""
    suffix = "." + COMPENSATION_CHILD
    return {
        name[: -len(suffix)]: module
        for name, module in model.named_modules()
        if isinstance(module, LowRankCompensation) and name.endswith(suffix)
    }


class FactorizedLinear(nn.Module):
    """A Linear stored as two factors: ``y = (x Aᵀ) Bᵀ + bias``, A r×in, B out×r."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features = a.shape[1]
        self.out_features = b.shape[0]
        self.A = nn.Parameter(a.detach().contiguous())
        self.B = nn.Parameter(b.detach().contiguous())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        # Saved as the dense product so plain transformers loads the checkpoint unchanged.
        self._register_state_dict_hook(_dense_state_dict)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def dense_weight(self) -> torch.Tensor:
        return (self.B.float() @ self.A.float()).to(self.A.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.B, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"


def _dense_state_dict(module: FactorizedLinear, state_dict, prefix: str, _metadata) -> None:
    state_dict.pop(prefix + "A")
    state_dict.pop(prefix + "B")
    state_dict[prefix + "weight"] = module.dense_weight().detach()

