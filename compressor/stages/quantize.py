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
        awq: {then: rtn, grid: 20, duo_scaling: true, search_tokens: 8192}   # method: awq only
        overrides:              # mixed precision: per-module rules (compressor.stages.quant_overrides)
          - {targets: ["re:.*down_proj"], weights: {bits: 8}}
          - {targets: ["re:model\\.layers\\.0\\..*"], skip: true}
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, PositiveInt, field_validator, model_validator
from torch import nn

from compressor.algorithms.grid import WeightGrid, effective_group_size
from compressor.errors import RecipeError
from compressor.layerwise import find_decoder_blocks
from compressor.moe_experts import UnknownExpertsError, moe_gate_reason, unfuse_targeted_experts
from compressor.moe_plain_loading import plain_transformers_notes, stage_format
from compressor.recipe import StrictModel
from compressor.stages.base import Locator, StageContext, StagePlan
from compressor.stages.quant_methods import quant_method_registry
from compressor.stages.quant_overrides import OverrideRule, RuleChoice, resolve_rules
from compressor.stages.activation_methods import ACTIVATION_VARIANTS, is_quantized_layer
from compressor.stages.quant_schemes import (
    ActivationArgs,
    apply_method_defaults,
    check_float_weights,
    smooths_only,
    uses_activation_layers,
)
from compressor.targets import layer_pattern, select_modules, validate_pattern


class WeightArgs(StrictModel):
    bits: Literal[2, 3, 4, 8] = 4
    group_size: PositiveInt | None = 128  # null (or -1): one scale per output channel
    symmetric: bool = True
    type: Literal["int", "float"] = "int"  # float: FP8 e4m3, 8 bits, one scale per output channel
    observer: Literal["minmax", "mse", "hqq"] = "minmax"

    foreign_keys: ClassVar[dict[str, str]] = {
        "num_bits": "use `bits` (compressed-tensors' num_bits)",
        "sym": "use `symmetric` (GPTQModel's sym)",
        "strategy": "the strategy follows `group_size`: a number is group-wise, null or -1 one scale per output channel",
    }

    @field_validator("group_size", mode="before")
    @classmethod
    def _channel_wise_alias(cls, value: object) -> object:
        # -1 is how GPTQModel, AutoGPTQ and compressed-tensors itself spell "one scale per channel".
        return None if value == -1 and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _float_weights(self) -> "WeightArgs":
        return check_float_weights(self)


class QuantOverride(OverrideRule):
    weights: WeightArgs | None = None


class AWQArgs(StrictModel):
    """Options of `method: awq` (see compressor.algorithms.awq)."""

    then: Literal["rtn", "gptq"] = "rtn"  # how the scaled weights are quantized
    grid: int = Field(default=20, ge=2, le=200)  # points of the scaling exponent in [0, 1)
    duo_scaling: bool = True  # scales from activations and weights, not activations alone
    search_tokens: PositiveInt = 8192  # calibration tokens the search evaluates its loss on


_OVERRIDE_METHODS = ("rtn", "gptq", "awq", "hqq")
_GPTQ_OPTIONS = ("act_order", "dampening", "block_size")


def solves_with_gptq(config: "QuantizeConfig") -> bool:
    """Whether the stage's weights go through the GPTQ solver (the only reader of `_GPTQ_OPTIONS`)."""
    return config.method in ("gptq", "smoothquant+gptq") or (config.awq is not None and config.awq.then == "gptq")


def _check_gptq_options(config: "QuantizeConfig") -> None:
    """A GPTQ option set to anything but its default on a method that never runs GPTQ would be
    silently ignored; defaults pass, since the saved recipe.yaml writes every key out."""
    if solves_with_gptq(config):
        return
    given = config.keys_off_default()
    for key in _GPTQ_OPTIONS:
        if key in given:
            method = "awq with then: rtn" if config.method == "awq" else config.method
            raise ValueError(
                f"`{key}` is a GPTQ option (methods gptq, smoothquant+gptq, awq with then: gptq); {method} does not use it"
            )


class QuantizeConfig(StrictModel):
    method: str
    weights: WeightArgs = Field(default_factory=WeightArgs)
    activations: ActivationArgs | None = None  # W8A8 / FP8 activations; see quant_schemes.py
    targets: list[str] = Field(default_factory=lambda: ["Linear"], min_length=1)
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    act_order: bool = True
    dampening: float = Field(default=0.01, gt=0, lt=1)
    block_size: PositiveInt = 128
    awq: AWQArgs | None = None
    overrides: list[QuantOverride] = Field(default_factory=list)
    smoothing_strength: float = Field(default=0.5, ge=0, le=1)  # SmoothQuant's migration strength α
    double_quant: bool = False  # nf4: quantize the block absmaxes again (QLoRA's double quantization)

    foreign_keys: ClassVar[dict[str, str]] = {
        "damp_percent": "use `dampening` (GPTQModel's damp_percent; a fraction of the mean diagonal, 0.01 = 1 %)",
        "dampening_frac": "use `dampening` (llm-compressor's dampening_frac)",
        "desc_act": "use `act_order: true|false` (GPTQModel's desc_act)",
        "actorder": "use `act_order: true|false`; act order here always uses static groups (llm-compressor's actorder: static)",
        "static_groups": "groups are always static with `act_order: true` (scales from the unmodified weight, no g_idx stored)",
        "true_sequential": "GPTQ is always true-sequential on pre-norm blocks (README: True-sequential GPTQ)",
        "bits": "put it under `weights:` (weights: {bits: 4})",
        "group_size": "put it under `weights:` (weights: {group_size: 128})",
        "sym": "put it under `weights:` as `symmetric`",
        "scheme": "write the scheme as keys: W4A16 is weights: {bits: 4, group_size: 128}; W8A8 is weights: {bits: 8},"
        " activations: {bits: 8, dynamic: true}; FP8_DYNAMIC is method: fp8",
    }

    @model_validator(mode="after")
    def _method_options(self) -> "QuantizeConfig":
        if self.awq is not None and self.method != "awq":
            raise ValueError(f"`awq` options only apply to method: awq, not {self.method}")
        if self.method == "awq" and self.awq is None:
            self.awq = AWQArgs()
        _check_gptq_options(self)
        if self.method == "hqq" and self.weights.observer not in ("minmax", "hqq"):
            raise ValueError(f"method: hqq chooses its own scales; drop `observer: {self.weights.observer}`")
        if self.overrides and (self.method not in _OVERRIDE_METHODS or self.activations is not None or self.weights.type != "int"):
            raise ValueError(f"`overrides` apply to integer weight-only methods ({', '.join(_OVERRIDE_METHODS)})")
        return self

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
        hqq_search=weights.observer == "hqq",
    )


def module_weights(config: QuantizeConfig, choice: RuleChoice) -> WeightArgs | None:
    """The weight scheme of one module after `overrides` (None: left unquantized)."""
    weights = choice.weights
    if weights is not None and config.method == "hqq":
        weights = weights.model_copy(update={"observer": "hqq"})
    return weights


def _rule_choices(config: QuantizeConfig, modules: dict[str, nn.Module], locate: Locator | None):
    return resolve_rules(modules, config.overrides, config.weights, locate)


def _group_label(group_size: int | None) -> str:
    return "per-channel" if group_size is None else f"group {group_size}"


def _why_group_differs(asked: int, in_features: int) -> str:
    return f"{asked} > {in_features} columns" if asked > in_features else f"{asked} does not divide {in_features} columns"


def _describe(grid: WeightGrid, weights: WeightArgs, in_features: int) -> str:
    note = ""
    if weights.group_size is not None and grid.group_size != weights.group_size:
        note = f" ({_why_group_differs(weights.group_size, in_features)})"
    observer = "" if weights.observer == "minmax" else f", {weights.observer} observer"
    return f"int{grid.bits} {'sym' if grid.symmetric else 'asym'} {_group_label(grid.group_size)}{note}{observer}"


def group_fallback_notes(changed: dict[str, tuple[int, int, int | None]]) -> list[str]:
    """One warning per (asked group, columns, group used), naming the layers as patterns over the
    block index; `changed`: module name → that triple, for the layers whose group differs."""
    by_case: dict[tuple[int, int, int | None], list[str]] = {}
    for name, case in changed.items():
        pattern = layer_pattern(name)
        names = by_case.setdefault(case, [])
        if pattern not in names:
            names.append(pattern)
    return [
        f"group_size {asked} does not fit {', '.join(names)} ({_why_group_differs(asked, columns)}):"
        f" {_group_label(used)} there (written so in quantization_config)"
        for (asked, columns, used), names in by_case.items()
    ]


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
        if getattr(method, "splits_experts", True):  # fused MoE experts become one Linear per expert
            try:
                unfuse_targeted_experts(model, config.targets, config.ignore)
            except UnknownExpertsError as err:
                raise RecipeError(str(err), **locate("targets")) from None
        selection = select_modules(model, config.targets, config.ignore)
        plan = StagePlan(
            kind="quantize", method=config.method, skipped=dict(selection.skipped), notes=selection.notes(config)
        )
        block_prefix = find_decoder_blocks(model)[0] + "." if calibrated else ""
        candidates: dict[str, nn.Module] = {}
        describe = getattr(method, "describe", None)
        unsupported = getattr(method, "skip_reason", None)
        for name, module in selection.selected.items():
            if not isinstance(module, nn.Linear) or is_quantized_layer(module):
                if hasattr(module, "weight_packed") or is_quantized_layer(module):
                    plan.skipped[name] = "already quantized by an earlier stage"
                continue
            if calibrated and not name.startswith(block_prefix):
                plan.skipped[name] = f"outside the decoder blocks, which {config.method} calibrates (use method: rtn)"
                # Asked for (lm_head with `ignore: []`), yet left dense: say it where the run is watched.
                plan.notes.append(
                    f"{config.method} leaves {name} unquantized: it calibrates only the decoder blocks"
                    " (a later `method: rtn` stage can quantize it)"
                )
                continue
            reason = unsupported(module) if unsupported is not None else None
            reason = reason or moe_gate_reason(model, name, module)
            if reason is not None:
                plan.skipped[name] = reason
                continue
            candidates[name] = module
        regrouped: dict[str, tuple[int, int, int | None]] = {}
        for name, choice in _rule_choices(config, candidates, locate).items():
            weights = module_weights(config, choice)
            if weights is None:
                plan.skipped[name] = f"skipped by `overrides[{choice.rule}]`"
                continue
            rule = "" if choice.rule is None else f" [overrides[{choice.rule}]]"
            if describe is not None:
                plan.selected[name] = describe(candidates[name], config) + rule
                continue
            grid = grid_for(candidates[name], weights)
            plan.selected[name] = _describe(grid, weights, candidates[name].in_features) + rule
            if weights.group_size is not None and grid.group_size != weights.group_size:
                regrouped[name] = (weights.group_size, candidates[name].in_features, grid.group_size)
        plan.notes.extend(group_fallback_notes(regrouped))
        if not plan.selected:
            raise RecipeError("matches no Linear module of this model that the stage can quantize", **locate("targets"))
        written = stage_format(method.layer_class, config, smooths_only(config))
        plan.notes.extend(plain_transformers_notes(model, plan.selected, written))
        return plan

    def streams_blocks(self, config: QuantizeConfig) -> bool:
        """True when the method reads weights one decoder block at a time (through the
        layer-by-layer engine), so a model offloaded to disk need not be loaded whole first."""
        return bool(getattr(resolve_method(config), "streams_blocks", False))

    def run(self, model: nn.Module, config: QuantizeConfig, ctx: StageContext, plan: StagePlan) -> nn.Module:
        method = resolve_method(config)
        modules = {name: model.get_submodule(name) for name in plan.selected}
        choices = _rule_choices(config, modules, None)
        weights = {name: module_weights(config, choices[name]) for name in modules}
        grids = {name: grid_for(module, weights[name]) for name, module in modules.items()}
        method.quantize(model, modules, grids, config, ctx)
        _record_calibration(model, config, weights, ctx)
        return model


def _record_calibration(model: nn.Module, config: QuantizeConfig, weights: dict[str, WeightArgs], ctx: StageContext) -> None:
    """Give each new quantized layer its `weight_calibration` (compressor.stages.quant_provenance)."""
    from compressor.stages.quant_provenance import weight_calibration  # imports compressed-tensors

    gptq = solves_with_gptq(config) and config.act_order
    for name, args in weights.items():
        module = model.get_submodule(name)
        if not hasattr(module, "weight_calibration"):  # bitsandbytes' NF4 layers: not compressed-tensors
            continue
        float_weights = args.type == "float"  # FP8 weights are cast, never solved by GPTQ
        fell_back = bool(ctx.records.get(name, {}).get("fallback"))
        module.weight_calibration = weight_calibration(
            args.observer, float_weights=float_weights, act_order_ran=gptq and not float_weights and not fell_back
        )
