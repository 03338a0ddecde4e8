"""Which tensors a training stage updates, and how the compression survives it.

- Pruned Linear weights keep their zeros: a weight with exact zeros in more than
  `PRUNED_FRACTION` of its entries counts as pruned, its zero pattern becomes a mask that is
  applied to the gradient as autograd produces it (a tensor hook, so before DDP or DeepSpeed
  reduce it and before clipping measures it) and again to the weight after every optimizer step.
- Quantized layers (`QuantLinear`) keep their integer codes; only their scales and, for
  asymmetric layers, their zero points train. Scales become fp32 parameters and return to their
  dtype after. Zero points are integers in the format, so they train as fp32 values that the
  forward rounds (straight-through: the gradient passes the rounding unchanged) and clamps to
  the code range; the rounded value is packed back at the end, so the trained model computes
  exactly what the saved one will. While training, a QuantLinear runs a dequantize-then-matmul
  forward from its cached codes, which carries gradients to the scales and zero points (the
  packed kernels differentiate only with respect to the input).
- Trainable tensors train in fp32 (master weights) and are cast back when training ends,
  because bf16 cannot hold updates as small as a typical distillation step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from compressor.kernels.packing import pack_codes
from compressor.kernels.quant_linear import QuantLinear
from compressor.targets import matches

# A trained dense weight has essentially no exact zeros; a pruned one has many.
PRUNED_FRACTION = 0.01

TRAIN_MODES = ("auto", "unquantized", "scales", "lora")


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
            parameter = self.named[name]
            parameter.mul_(mask.to(parameter.device))

    def check_bound(self, model: nn.Module) -> None:
        """Fail when a wrapper (`accelerator.prepare`) replaced or resized a trainable tensor: the
        optimizer and the masks would then act on tensors the forward no longer reads."""
        present = {id(p): p for p in model.parameters()}
        for name, parameter in self.named.items():
            if id(parameter) not in present:
                raise RuntimeError(f"the prepared model no longer holds the trainable tensor {name} (sharded or copied)")
            mask = self.masks.get(name)
            if mask is not None and mask.shape != parameter.shape:
                raise RuntimeError(f"the trainable tensor {name} is {tuple(parameter.shape)} now, its mask {tuple(mask.shape)}")

    def finish(self) -> None:
        """Return every tensor to its original dtype and kind (buffer or frozen parameter)."""
        for restore in reversed(self._restores):
            restore()
        self._restores.clear()


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def _masked_gradient(mask: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return grad * mask.to(grad.device, grad.dtype)


def _train_parameter(trainable: TrainableSet, module: nn.Module, name: str, attribute: str, masked: bool) -> None:
    parameter: nn.Parameter = getattr(module, attribute)
    original_dtype = parameter.dtype
    parameter.data = parameter.data.float()
    parameter.requires_grad_(True)
    key = f"{name}.{attribute}" if name else attribute
    trainable.named[key] = parameter
    hook = None
    if masked:
        zeros = parameter.data == 0
        if zeros.float().mean().item() > PRUNED_FRACTION:
            mask = trainable.masks[key] = (~zeros).to(parameter.dtype)
            hook = parameter.register_hook(partial(_masked_gradient, mask))

    def restore() -> None:
        if hook is not None:
            hook.remove()
        parameter.requires_grad_(False)
        parameter.data = parameter.data.to(original_dtype)

    trainable._restores.append(restore)


def _rounded_zero(zero: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """round + clamp in the forward, identity in the backward (straight-through estimator)."""
    return zero + (zero.round().clamp(qmin, qmax) - zero).detach()


def _code_range(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def _training_forward(module: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    scale = module.weight_scale
    grouped = module.training_codes.float().reshape(module.out_features, scale.shape[1], -1)
    if module.training_zero_point is not None:
        grouped = grouped - _rounded_zero(module.training_zero_point, *_code_range(module.bits)).unsqueeze(-1)
    weight = (grouped * scale.float().unsqueeze(-1)).reshape(module.out_features, module.in_features)
    return F.linear(x, weight.to(x.dtype), module.bias)


def _train_quantization(trainable: TrainableSet, module: QuantLinear, name: str) -> None:
    buffer = module._buffers.pop("weight_scale")
    parameter = nn.Parameter(buffer.float())
    module.weight_scale = parameter
    prefix = f"{name}." if name else ""
    trainable.named[f"{prefix}weight_scale"] = parameter
    # Registered on the module so that `.to(device)` moves them and DDP averages the gradients.
    module.register_buffer("training_codes", module.codes(), persistent=False)
    zero = nn.Parameter(module.zero_points().float()) if module.weight_zero_point is not None else None
    module.register_parameter("training_zero_point", zero)
    if zero is not None:
        trainable.named[f"{prefix}weight_zero_point"] = zero
    # An instance attribute shadows the class's forward until `restore` deletes it.
    module.forward = partial(_training_forward, module)

    def restore() -> None:
        del module.forward, module.training_codes, module.training_zero_point
        value = parameter.detach().to(buffer.dtype)
        del module.weight_scale
        module.register_buffer("weight_scale", value)
        if zero is not None:
            rounded = zero.detach().round().clamp(*_code_range(module.bits)).to(torch.int8)
            module.weight_zero_point.copy_(pack_codes(rounded.cpu(), module.bits, dim=0).to(module.weight_zero_point.device))

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
                yield name, module, "scales" if module.weight_zero_point is None else "scales, zero points"
        elif mode in ("auto", "unquantized"):
            # A Linear with integer storage (bitsandbytes NF4 / int8) is quantized too, with no
            # scales of ours to train: it stays frozen like the codes of a QuantLinear.
            if isinstance(module, nn.Linear) and module.weight.is_floating_point():
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
        if what.startswith("scales"):
            _train_quantization(trainable, module, name)
        elif what == "norm weight":
            _train_parameter(trainable, module, name, "weight", masked=False)
        else:
            _train_parameter(trainable, module, name, "weight", masked=True)
            if module.bias is not None:
                _train_parameter(trainable, module, name, "bias", masked=False)
    return trainable
