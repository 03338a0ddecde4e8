"""The `prune` stage: unstructured, N:M and structured pruning.

Recipe block::

    - prune:
        method: sparsegpt        # magnitude | wanda | sparsegpt (see prune_methods.py)
        sparsity: "2:4"          # 0.5 (unstructured) | "2:4" / "4:8" (N:M) |
                                 # {heads: 0.25} | {mlp_channels: 0.3} | {layers: [20, 21]} |
                                 # {layers: auto, count: 4} | {experts: 0.25}   (structured)
        schedule: uniform        # or owl: outlier-weighted per-block sparsity (unstructured only)
        owl: {threshold: 5.0, spread: 0.08}
        targets: [Linear]
        ignore: [lm_head]
        dampening: 0.01          # sparsegpt
        block_size: 128          # sparsegpt: columns per lazy-update block
        storage: sparse          # sparse: bitmask-compressed on disk; dense: plain weights with zeros
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PositiveInt, ValidationError, field_validator, model_validator
from torch import nn

from compressor.algorithms.masks import NMPattern, parse_nm
from compressor.errors import RecipeError
from compressor.layerwise import find_decoder_blocks
from compressor.moe_experts import UnknownExpertsError, unfuse_targeted_experts
from compressor.recipe import StrictModel
from compressor.stages.base import Locator, StageContext, StagePlan
from compressor.stages.prune_methods import LayerTarget, prune_method_registry
from compressor.stages.prune_owl import owl_targets
from compressor.targets import select_modules, validate_pattern


def _fraction(value: float | None) -> float | None:
    if value is not None and not 0.0 < value < 1.0:
        raise ValueError(f"must be a fraction strictly between 0 and 1, got {value!r}")
    return value


class StructuredSparsity(StrictModel):
    """Structured pruning: exactly one of heads, mlp_channels, layers, experts."""

    heads: float | None = None
    mlp_channels: float | None = None
    layers: list[int] | Literal["auto"] | None = None
    count: PositiveInt | None = None
    experts: float | None = None

    @field_validator("heads", "mlp_channels", "experts")
    @classmethod
    def _in_range(cls, value: float | None) -> float | None:
        return _fraction(value)

    @model_validator(mode="after")
    def _one_kind(self) -> "StructuredSparsity":
        given = [k for k in ("heads", "mlp_channels", "layers", "experts") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of heads, mlp_channels, layers, experts")
        if self.layers == "auto" and self.count is None:
            raise ValueError("layers: auto needs count: how many blocks to remove")
        if self.count is not None and self.layers != "auto":
            raise ValueError("count goes with layers: auto")
        if isinstance(self.layers, list) and not self.layers:
            raise ValueError("layers: give at least one block index")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("heads", "mlp_channels", "layers", "experts") if getattr(self, k) is not None)


class OWLArgs(StrictModel):
    threshold: float = Field(default=5.0, gt=0)  # outlier: score > threshold × layer mean
    spread: float = Field(default=0.08, gt=0, lt=0.5)  # per-block sparsity within target ± spread


class PruneConfig(StrictModel):
    method: str
    sparsity: float | str | StructuredSparsity
    schedule: Literal["uniform", "owl"] = "uniform"
    owl: OWLArgs = Field(default_factory=OWLArgs)
    targets: list[str] = Field(default_factory=lambda: ["Linear"], min_length=1)
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    dampening: float = Field(default=0.01, gt=0, lt=1)
    block_size: PositiveInt = 128
    storage: Literal["sparse", "dense"] = "sparse"

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        registry = prune_method_registry()
        if value not in registry:
            raise ValueError(registry.unknown_message(value))
        return value

    @field_validator("sparsity", mode="before")
    @classmethod
    def _check_sparsity(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"must be a fraction, an N:M string or a mapping, got {value!r}")
        if isinstance(value, (int, float)):
            _fraction(float(value))
            return float(value)
        if isinstance(value, str):
            parse_nm(value)
            return value.replace(" ", "")
        if isinstance(value, dict):
            try:
                return StructuredSparsity.model_validate(value)
            except ValidationError as err:
                # Validated here so the user sees the structured block's own complaint rather
                # than the union's first member ("must be a number").
                first = err.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                message = str(first["msg"]).removeprefix("Value error, ")
                if first["type"] == "extra_forbidden":
                    message = f"unknown key (known: {', '.join(StructuredSparsity.model_fields)})"
                raise ValueError(f"{where}: {message}" if where else message) from None
        raise ValueError(f"must be a fraction (0.5), an N:M string (\"2:4\") or a mapping ({{heads: 0.25}}), got {value!r}")

    @field_validator("targets", "ignore")
    @classmethod
    def _valid_patterns(cls, values: list[str]) -> list[str]:
        return [validate_pattern(v) for v in values]

    @model_validator(mode="after")
    def _schedule_fits(self) -> "PruneConfig":
        if self.schedule == "owl" and not isinstance(self.sparsity, float):
            raise ValueError("schedule: owl applies to unstructured sparsity (a fraction such as 0.5)")
        if isinstance(self.sparsity, str) and self.block_size % parse_nm(self.sparsity).group:
            raise ValueError(f"block_size {self.block_size} must be a multiple of M in {self.sparsity}")
        return self

    @property
    def pattern(self) -> NMPattern | None:
        return parse_nm(self.sparsity) if isinstance(self.sparsity, str) else None

    @property
    def structured(self) -> StructuredSparsity | None:
        return self.sparsity if isinstance(self.sparsity, StructuredSparsity) else None


class PruneStage:
    def needs_calibration(self, config: PruneConfig) -> bool:
        if config.structured is not None:
            from compressor.stages.prune_structured import structured_needs_calibration

            return structured_needs_calibration(config)
        return prune_method_registry().get(config.method).calibrated or config.schedule == "owl"

    def plan(self, model: nn.Module, config: PruneConfig, locate: Locator) -> StagePlan:
        if config.structured is not None:
            from compressor.stages.prune_structured import plan_structured

            return plan_structured(model, config, locate)
        calibrated = self.needs_calibration(config)
        try:  # fused MoE experts become one Linear per expert, as for quantize, so they are pruned too
            unfuse_targeted_experts(model, config.targets, config.ignore)
        except UnknownExpertsError as err:
            raise RecipeError(str(err), **locate("targets")) from None
        selection = select_modules(model, config.targets, config.ignore)
        plan = StagePlan(
            kind="prune", method=config.method, skipped=dict(selection.skipped), notes=selection.notes(config)
        )
        block_prefix = find_decoder_blocks(model)[0] + "." if calibrated else ""
        pattern = config.pattern
        for name, module in selection.selected.items():
            if not isinstance(module, nn.Linear):
                if hasattr(module, "weight_packed"):
                    plan.skipped[name] = "quantized by an earlier stage; prune before quantizing"
                continue
            if calibrated and not name.startswith(block_prefix):
                plan.skipped[name] = f"outside the decoder blocks, which {config.method} calibrates (use method: magnitude)"
                continue
            if pattern is not None and module.in_features % pattern.group:
                raise RecipeError(
                    f"{name} has {module.in_features} input columns, not divisible by {pattern.group} for"
                    f" {pattern} sparsity; add it to `ignore`",
                    **locate("sparsity"),
                )
            plan.selected[name] = f"{pattern} semi-structured" if pattern else _unstructured_detail(config)
        if not plan.selected:
            raise RecipeError("matches no Linear module of this model that the stage can prune", **locate("targets"))
        return plan

    def run(self, model: nn.Module, config: PruneConfig, ctx: StageContext, plan: StagePlan) -> nn.Module:
        if config.structured is not None:
            from compressor.stages.prune_structured import run_structured

            return run_structured(model, config, ctx, plan)
        modules = {name: model.get_submodule(name) for name in plan.selected}
        targets: dict[str, LayerTarget]
        if config.pattern is not None:
            targets = {name: config.pattern for name in modules}
        elif config.schedule == "owl":
            targets = owl_targets(model, modules, config, ctx)
        else:
            targets = {name: float(config.sparsity) for name in modules}
        prune_method_registry().get(config.method).prune(model, modules, targets, config, ctx)
        for module in modules.values():
            module.sparse_storage = config.storage
        return model


def _unstructured_detail(config: PruneConfig) -> str:
    if config.schedule == "owl":
        return f"unstructured {config.sparsity:.0%} on average (OWL per block)"
    return f"unstructured {config.sparsity:.0%}"
