"""Quantize methods whose layers also quantize their inputs: W8A8 (int8) and FP8, with or
without SmoothQuant in front.

One block algorithm serves every combination. Its statistics pass, through the layer-wise
engine, gathers for each group of Linears that read the same input tensor:
- the per-channel maximum of |input| (SmoothQuant scales; a static per-tensor input scale is
  the maximum over channels, so one statistic serves both),
- the Hessian of the input when the weights are solved with GPTQ,
- which module produced that input, found by tensor identity: when it is a normalization layer
  (a per-channel weight), the group can be smoothed by folding scales into it. Nothing is
  read from a per-architecture table.
Then ``compress`` smooths each foldable group (and checks the fold kept the norm's function),
quantizes the weights to 8 bits per output channel (RTN or GPTQ; FP8 by casting) and puts a
``W8A8Linear`` in place of each Linear.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compressor.algorithms.fp8 import fp8_quantize
from compressor.algorithms.gptq import HessianAccumulator, gptq_quantize
from compressor.algorithms.grid import WeightGrid
from compressor.algorithms.rtn import rtn_quantize
from compressor.algorithms.smoothquant import (
    columns_absmax,
    fold_smoothing,
    is_foldable_norm,
    smoothed_hessian,
    smoothing_scales,
)
from compressor.kernels.w8a8_linear import ActivationScheme, W8A8Linear, type_max
from compressor.layerwise import run_layerwise
from compressor.stages.base import StageContext, replace_module
from compressor.stages.quant_schemes import smooths_only

FOLD_TOLERANCE = 2e-2  # relative; bf16 norms round their output, so the check cannot be exact


def activation_scheme(config: Any) -> ActivationScheme | None:
    args = config.activations
    return None if args is None else ActivationScheme(type=args.type, dynamic=args.dynamic)


@dataclass
class _InputGroup:
    """Linears that read one input tensor, and what was gathered about that input."""

    names: list[str]
    absmax: torch.Tensor
    hessian: HessianAccumulator | None = None
    producer: str | None = None  # the module whose output is this input, when found
    norm_sample: torch.Tensor | None = None  # a few rows of the producer's input, to check the fold


@dataclass
class _BlockState:
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # Linear name → its input this chunk
    outputs: dict[tuple, str] = field(default_factory=dict)  # (data_ptr, shape) → producer name
    producer_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    groups: list[_InputGroup] = field(default_factory=list)


def _key(tensor: torch.Tensor) -> tuple:
    return (tensor.data_ptr(), tuple(tensor.shape))


class ActivationQuantMethod:
    """W8A8 / FP8 layers, optionally after SmoothQuant; weights by RTN or GPTQ."""

    layer_class = "W8A8Linear"

    def __init__(self, *, smoothing: bool, solver: str):
        self.smoothing = smoothing
        self.solver = solver  # "rtn" | "gptq"

    @property
    def calibrated(self) -> bool:
        """Whether every use needs calibration data (static activations need it too)."""
        return self.smoothing or self.solver == "gptq"

    def needs_calibration(self, config: Any) -> bool:
        static = config.activations is not None and not config.activations.dynamic
        return self.calibrated or static

    def describe(self, module: nn.Linear, config: Any) -> str:
        smooth = f"smooth α={config.smoothing_strength} → " if self.smoothing else ""
        if smooths_only(config):
            return f"smooth α={config.smoothing_strength} (weights left for a later stage)"
        weights = "int8" if config.weights.type == "int" else "fp8-e4m3"
        if config.weights.observer != "minmax":
            weights += f" ({config.weights.observer} observer)"
        acts = config.activations
        if acts is None:
            act = "a16"
        else:
            act = f"a8 {'int8' if acts.type == 'int' else 'fp8'} {'dynamic per-token' if acts.dynamic else 'static per-tensor'}"
        return f"{smooth}{weights} per-channel ({self.solver}), {act}"

    def quantize(self, model, modules, grids, config, ctx: StageContext) -> None:
        algorithm = _ActivationQuantBlocks(model, modules, config, ctx, self)
        if not self.needs_calibration(config):
            algorithm.quantize_without_statistics()
            return
        run_layerwise(
            model,
            ctx.calibration(),
            algorithm,
            batch_size=ctx.batch_size,
            device=ctx.device,
            description=config.method,
            show_progress=ctx.show_progress,
        )


class _ActivationQuantBlocks:
    def __init__(self, model: nn.Module, modules: dict[str, nn.Linear], config, ctx: StageContext, method):
        self.model = model
        self.modules = modules
        self.config = config
        self.ctx = ctx
        self.method: ActivationQuantMethod = method
        self.state = _BlockState()

    # -- statistics pass ---------------------------------------------------------------------

    def attach(self, index: int, name: str, block: nn.Module):
        self.state = _BlockState()
        prefix = name + "."
        handles = []
        for module_name, module in self.modules.items():
            if module_name.startswith(prefix):
                handles.append(module.register_forward_hook(self._input_hook(module_name)))
        if self.method.smoothing:
            for sub_name, sub in block.named_modules():
                if not isinstance(sub, nn.Linear) and getattr(sub, "weight", None) is not None:
                    handles.append(sub.register_forward_hook(self._output_hook(f"{prefix}{sub_name}")))
        return handles

    def _input_hook(self, module_name: str):
        def hook(_module, args, _output):
            self.state.inputs[module_name] = args[0].detach()

        return hook

    def _output_hook(self, module_name: str):
        def hook(_module, args, output):
            if isinstance(output, torch.Tensor):
                self.state.outputs[_key(output)] = module_name
                if module_name not in self.state.producer_inputs and args:
                    self.state.producer_inputs[module_name] = args[0].detach().reshape(-1, args[0].shape[-1])[:64].clone()

        return hook

    def after_chunk(self) -> None:
        state = self.state
        if not state.inputs:
            return
        if not state.groups:
            state.groups = self._make_groups()
        for group in state.groups:
            x = state.inputs[group.names[0]]
            group.absmax = torch.maximum(group.absmax, x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float())
            if group.hessian is not None:
                group.hessian.add(x)
        state.inputs.clear()
        state.outputs.clear()

    def _make_groups(self) -> list[_InputGroup]:
        state = self.state
        by_input: dict[tuple, list[str]] = defaultdict(list)
        for module_name, tensor in state.inputs.items():
            by_input[_key(tensor)].append(module_name)
        groups = []
        for key, names in by_input.items():
            x = state.inputs[names[0]]
            producer = state.outputs.get(key)
            groups.append(
                _InputGroup(
                    names=names,
                    absmax=torch.zeros(x.shape[-1], dtype=torch.float32, device=x.device),
                    hessian=HessianAccumulator(x.shape[-1], device=x.device) if self.method.solver == "gptq" else None,
                    producer=producer,
                    norm_sample=state.producer_inputs.get(producer) if producer else None,
                )
            )
        return groups

    # -- compression -------------------------------------------------------------------------

    def compress(self, index: int, name: str, block: nn.Module) -> None:
        for group in self.state.groups:
            scales = self._smooth(group) if self.method.smoothing else None
            hessian = group.hessian.hessian if group.hessian is not None else None
            absmax = group.absmax
            if scales is not None:
                absmax = absmax / scales
                hessian = smoothed_hessian(hessian, scales) if hessian is not None else None
            for module_name in group.names:
                self._quantize_module(module_name, hessian, absmax, group, scales is not None)
        self.state = _BlockState()

    def quantize_without_statistics(self) -> None:
        for module_name in list(self.modules):
            self._quantize_module(module_name, None, None, None, False)

    def _smooth(self, group: _InputGroup) -> torch.Tensor | None:
        """Fold SmoothQuant scales into the group's producer norm; None when it is not a norm."""
        linears = [self.modules[n] for n in group.names]
        channels = linears[0].in_features
        if group.producer is None or group.norm_sample is None:
            return None
        norm = self.model.get_submodule(group.producer)
        if not is_foldable_norm(norm, channels):
            return None
        scales = smoothing_scales(group.absmax, columns_absmax(linears), self.config.smoothing_strength)
        scales = scales.to(group.absmax.device)
        with torch.no_grad():
            before = norm(group.norm_sample).float()
            saved = [norm.weight.data.clone()] + [m.weight.data.clone() for m in linears]
            saved_bias = norm.bias.data.clone() if isinstance(getattr(norm, "bias", None), torch.Tensor) else None
            fold_smoothing(norm, linears, scales)
            after = norm(group.norm_sample).float()
        expected = before / scales
        error = (after - expected).norm() / expected.norm().clamp(min=1e-12)
        if not torch.isfinite(error) or error > FOLD_TOLERANCE:
            # Not a plain per-channel scale (e.g. a norm computing x * (1 + w)): undo, leave unsmoothed.
            norm.weight.data = saved[0]
            if saved_bias is not None:
                norm.bias.data = saved_bias
            for module, weight in zip(linears, saved[1:]):
                module.weight.data = weight
            return None
        return scales

    def _quantize_module(
        self,
        module_name: str,
        hessian: torch.Tensor | None,
        absmax: torch.Tensor | None,
        group: _InputGroup | None,
        smoothed: bool,
    ) -> None:
        module = self.modules[module_name]
        record: dict[str, Any] = {"stage": "quantize", "method": self.config.method}
        if self.method.smoothing:
            record["smoothing_strength"] = self.config.smoothing_strength
            record["smoothed_by"] = group.producer if smoothed and group is not None else None
        if smooths_only(self.config):
            self.ctx.records[module_name] = {**record, "weights": "unchanged (smoothing only)"}
            return
        dtype = module.weight.dtype
        codes, scale, extra = self._quantize_weight(module, hessian)
        scheme = activation_scheme(self.config)
        input_scale = None
        if scheme is not None and not scheme.dynamic:
            assert absmax is not None
            input_scale = (absmax.max() / type_max(scheme.type)).clamp(min=1e-12).reshape(1).to(dtype).float()
        new = W8A8Linear.from_codes(
            codes, scale, weight_type=self.config.weights.type, activations=scheme,
            input_scale=input_scale, bias=module.bias, dtype=dtype,
        )
        replace_module(self.model, module_name, new)
        record.update(
            weights=f"{'int8' if self.config.weights.type == 'int' else 'fp8-e4m3'} per-channel ({self.method.solver})",
            activations=self.config.activations.model_dump() if self.config.activations is not None else None,
            **extra,
        )
        if input_scale is not None:
            record["input_scale"] = float(input_scale)
        self.ctx.records[module_name] = record

    def _quantize_weight(self, module: nn.Linear, hessian: torch.Tensor | None):
        dtype = module.weight.dtype
        if self.config.weights.type == "float":
            mse = self.config.weights.observer == "mse"
            codes, scale = fp8_quantize(module.weight.data, dtype, mse_search=mse)
            return codes, scale, {"observer": "mse"} if mse else {}
        observer = self.config.weights.observer
        grid = WeightGrid(bits=8, symmetric=True, group_size=None, scale_dtype=dtype,
                          mse_search=observer == "mse", hqq_search=observer == "hqq")
        if hessian is None:
            codes, scale, _ = rtn_quantize(module.weight.data, grid)
            return codes, scale, {}
        result = gptq_quantize(
            module.weight.data, hessian, grid,
            block_size=self.config.block_size, dampening=self.config.dampening, act_order=self.config.act_order,
        )
        return result.codes, result.scale, {"gptq_error": result.error, "damping": result.damping, "fallback": result.fallback}


def is_quantized_layer(module: nn.Module) -> bool:
    """A layer an earlier stage already quantized (bitsandbytes' Linear4bit subclasses nn.Linear)."""
    return isinstance(module, W8A8Linear) or type(module).__module__.startswith("bitsandbytes")


ACTIVATION_VARIANTS = {
    # What `rtn` / `gptq` become when the stage also quantizes activations or uses FP8 weights.
    "rtn": ActivationQuantMethod(smoothing=False, solver="rtn"),
    "gptq": ActivationQuantMethod(smoothing=False, solver="gptq"),
}
