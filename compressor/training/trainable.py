"""Which tensors a training stage updates, and how the compression survives it.

- Pruned Linear weights keep their zeros: a weight with exact zeros in more than
  `PRUNED_FRACTION` of its entries counts as pruned, its zero pattern becomes a mask that is
  applied to the gradient and again after every optimizer step.
- Quantized layers (`QuantLinear`) keep their integer codes; only their scales can train
  (the scales become fp32 parameters while training and return to their dtype after).
- Trainable tensors train in fp32 (master weights) and are cast back when training ends,
  because bf16 cannot hold updates as small as a typical distillation step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from compressor.kernels.quant_linear import QuantLinear
from compressor.targets import matches

# A trained dense weight has essentially no exact zeros; a pruned one has many.
PRUNED_FRACTION = 0.01

TRAIN_MODES = ("auto", "unquantized", "scales")


@dataclass
class TrainableSet:
    named: dict[str, nn.Parameter] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    _restores: list[Callable[[], None]] = field(default_factory=list)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.named.values())

    @torch.no_grad()
    def apply_masks(self) -> None:
        for name, mask in self.masks.items():
            self.named[name].mul_(mask)

    def mask_gradients(self) -> None:
        for name, mask in self.masks.items():
            grad = self.named[name].grad
            if grad is not None:
                grad.mul_(mask)

    def finish(self) -> None:
        """Return every tensor to its original dtype and kind (buffer or frozen parameter)."""
        for restore in reversed(self._restores):
            restore()
        self._restores.clear()


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def _train_parameter(trainable: TrainableSet, module: nn.Module, name: str, attribute: str, masked: bool) -> None:
    parameter: nn.Parameter = getattr(module, attribute)
    original_dtype = parameter.dtype
    parameter.data = parameter.data.float()
    parameter.requires_grad_(True)
    key = f"{name}.{attribute}" if name else attribute
    trainable.named[key] = parameter
    if masked:
        zeros = parameter.data == 0
        if zeros.float().mean().item() > PRUNED_FRACTION:
            trainable.masks[key] = (~zeros).to(parameter.dtype)

    def restore() -> None:
        parameter.requires_grad_(False)
        parameter.data = parameter.data.to(original_dtype)

    trainable._restores.append(restore)


def _train_scale(trainable: TrainableSet, module: QuantLinear, name: str) -> None:
    buffer = module._buffers.pop("weight_scale")
    parameter = nn.Parameter(buffer.float())
    module.weight_scale = parameter
    trainable.named[f"{name}.weight_scale"] = parameter

    def restore() -> None:
        value = parameter.detach().to(buffer.dtype)
        del module.weight_scale
        module.register_buffer("weight_scale", value)

    trainable._restores.append(restore)


def _trainable_modules(model: nn.Module, mode: str, ignore: list[str]):
    """(name, module, what trains) for every module `mode` touches."""
    if mode not in TRAIN_MODES:
        raise ValueError(f"unknown train mode {mode!r}")
    seen: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in seen or (name and any(matches(pattern, name, module) for pattern in ignore)):
            continue
        seen.add(id(module))
        if isinstance(module, QuantLinear):
            if mode in ("auto", "scales"):
                yield name, module, "scales"
        elif mode in ("auto", "unquantized"):
            if isinstance(module, nn.Linear):
                yield name, module, "weight" if module.bias is None else "weight, bias"
            elif _is_norm(module) and getattr(module, "weight", None) is not None:
                yield name, module, "norm weight"


def describe_trainable(model: nn.Module, mode: str, ignore: list[str]) -> dict[str, str]:
    """What would train, by module name, without changing the model (for plans and dry runs)."""
    return {name: what for name, _, what in _trainable_modules(model, mode, ignore)}


def select_trainable(model: nn.Module, mode: str, ignore: list[str]) -> TrainableSet:
    """Freeze everything, then make trainable what `mode` names (see the module docstring)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trainable = TrainableSet()
    for name, module, what in list(_trainable_modules(model, mode, ignore)):
        if what == "scales":
            _train_scale(trainable, module, name)
        elif what == "norm weight":
            _train_parameter(trainable, module, name, "weight", masked=False)
        else:
            _train_parameter(trainable, module, name, "weight", masked=True)
            if module.bias is not None:
                _train_parameter(trainable, module, name, "bias", masked=False)
    return trainable
