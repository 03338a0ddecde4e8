"""The `quantize` stage: integer weight quantization of Linear layers.

Recipe block::

    - quantize:
        method: gptq            # see `compressor.stages.quant_methods` for the registry
        weights: {bits: 4, group_size: 128, symmetric: true, observer: minmax}   # type: float → FP8 e4m3
        activations: null       # {bits: 8, type: int, dynamic: true, strategy: token} for W8A8
        targets: [Linear]
        ignore: [lm_head]
        act_order: true
        dampening: 0.01
        block_size: 128
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, PositiveInt, field_validator, model_validator
from torch import nn

from compressor.algorithms.grid import WeightGrid, effective_group_size
from compressor.errors import RecipeError
from compressor.layerwise import find_decoder_blocks
from compressor.recipe import StrictModel
from compressor.stages.base import Locator, StageContext, StagePlan
from compressor.stages.quant_methods import quant_method_registry
from compressor.stages.activation_methods import ACTIVATION_VARIANTS, is_quantized_layer
from compressor.stages.quant_schemes import (
    ActivationArgs,
    apply_method_defaults,
    check_float_weights,
    uses_activation_layers,
)
from compressor.targets import select_modules, validate_pattern


class WeightArgs(StrictModel):
    bits: Literal[2, 3, 4, 8] = 4
    group_size: PositiveInt | None = 128  # null: one scale per output channel
    symmetric: bool = True
    type: Literal["int", "float"] = "int"  # float: FP8 e4m3, 8 bits, one scale per output channel
    observer: Literal["minmax", "mse"] = "minmax"

    @model_validator(mode="after")
    def _float_weights(self) -> "WeightArgs":
        return check_float_weights(self)


class QuantizeConfig(StrictModel):
    method: str
    weights: WeightArgs = Field(default_factory=WeightArgs)
    activations: ActivationArgs | None = None  # W8A8 / FP8 activations; see quant_schemes.py
    targets: list[str] = Field(default_factory=lambda: ["Linear"], min_length=1)
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    act_order: bool = True
    dampening: float = Field(default=0.01, gt=0, lt=1)
    block_size: PositiveInt = 128
    smoothing_strength: float = Field(default=0.5, ge=0, le=1)  # SmoothQuant's migration strength α
    double_quant: bool = False  # nf4: quantize the block absmaxes again (QLoRA's double quantization)

    @model_validator(mode="after")
    def _method_defaults(self) -> "QuantizeConfig":
        return apply_method_defaults(self)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        registry = quant_method_registry()
        if value not in registry:
            raise ValueError(registry.unknown_message(value))
        return value

    @field_validator("targets", "ignore")
    @classmethod
    def _valid_patterns(cls, values: list[str]) -> list[str]:
        return [validate_pattern(v) for v in values]


def grid_for(module: nn.Linear, weights: WeightArgs) -> WeightGrid:
    return WeightGrid(
        bits=weights.bits,
        symmetric=weights.symmetric,
        group_size=effective_group_size(module.in_features, weights.group_size),
        scale_dtype=module.weight.dtype if module.weight.dtype.is_floating_point else torch.bfloat16,
        mse_search=weights.observer == "mse",
    )


def _describe(grid: WeightGrid, weights: WeightArgs, in_features: int) -> str:
    group = "per-channel" if grid.group_size is None else f"group {grid.group_size}"
    note = ""
    if weights.group_size is not None and grid.group_size != weights.group_size:
        note = f" ({weights.group_size} does not divide {in_features} columns)"
    return f"int{grid.bits} {'sym' if grid.symmetric else 'asym'} {group}{note}"


def resolve_method(config: QuantizeConfig):
    """The implementation for the stage: `rtn`/`gptq` turn into their W8A8/FP8 variants when
    the stage quantizes activations or uses FP8 weights."""
    method = quant_method_registry().get(config.method)
    if uses_activation_layers(config) and config.method in ACTIVATION_VARIANTS:
        return ACTIVATION_VARIANTS[config.method]
    return method


def _needs_calibration(method, config: QuantizeConfig) -> bool:
    check = getattr(method, "needs_calibration", None)
    return check(config) if check is not None else method.calibrated


class QuantizeStage:
    def needs_calibration(self, config: QuantizeConfig) -> bool:
        return _needs_calibration(resolve_method(config), config)

    def plan(self, model: nn.Module, config: QuantizeConfig, locate: Locator) -> StagePlan:
        method = resolve_method(config)
        calibrated = _needs_calibration(method, config)
        selection = select_modules(model, config.targets, config.ignore)
        plan = StagePlan(kind="quantize", method=config.method, skipped=dict(selection.skipped))
        block_prefix = find_decoder_blocks(model)[0] + "." if calibrated else ""
        describe = getattr(method, "describe", None)
        unsupported = getattr(method, "skip_reason", None)
        for name, module in selection.selected.items():
            if not isinstance(module, nn.Linear) or is_quantized_layer(module):
                if hasattr(module, "weight_packed") or is_quantized_layer(module):
                    plan.skipped[name] = "already quantized by an earlier stage"
                continue
            if calibrated and not name.startswith(block_prefix):
                plan.skipped[name] = f"outside the decoder blocks, which {config.method} calibrates (use method: rtn)"
                continue
            reason = unsupported(module) if unsupported is not None else None
            if reason is not None:
                plan.skipped[name] = reason
                continue
            if describe is not None:
                plan.selected[name] = describe(module, config)
                continue
            grid = grid_for(module, config.weights)
            plan.selected[name] = _describe(grid, config.weights, module.in_features)
        if not plan.selected:
            raise RecipeError("matches no Linear module of this model that the stage can quantize", **locate("targets"))
        return plan

    def run(self, model: nn.Module, config: QuantizeConfig, ctx: StageContext, plan: StagePlan) -> nn.Module:
        method = resolve_method(config)
        modules = {name: model.get_submodule(name) for name in plan.selected}
        grids = {name: grid_for(module, config.weights) for name, module in modules.items()}
        method.quantize(model, modules, grids, config, ctx)
        return model
