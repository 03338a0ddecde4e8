"""The `lowrank` stage: low-rank terms on top of (or instead of) Linear layers.

Recipe block::

    - lowrank:
        method: eora          # eora | svd | lora (see compressor.stages.lowrank_methods)
        rank: 32              # eora, lora, svd (svd: rank or energy)
        energy: null          # svd only: keep this share of the squared singular values
        targets: [Linear, QuantLinear]
        ignore: [lm_head]
        original: null        # eora only: where the uncompressed weights are (default: the model's source)
        alpha: null           # lora only (default 2 × rank); steps, lr, batch_size, dropout, seed, dataset,
                              # max_grad_norm (0.3; 0: off), warmup_steps (default ≈ 3 % of steps)

Keys that belong to another method are refused by name at plan time (so `--dry-run` shows it).
"""

from __future__ import annotations

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, field_validator

from compressor.errors import RecipeError
from compressor.recipe import CalibrationSpec, StrictModel
from compressor.stages.base import Locator, StageContext, StagePlan
from compressor.stages.lowrank_methods import lowrank_method_registry
from compressor.targets import select_modules, validate_pattern
from compressor.training.stability import QLORA_MAX_GRAD_NORM


class LowRankConfig(StrictModel):
    method: str
    rank: PositiveInt | None = None
    energy: float | None = Field(default=None, gt=0, le=1)
    targets: list[str] = Field(default_factory=lambda: ["Linear", "QuantLinear"], min_length=1)
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    # eora
    original: str | None = None
    eigen_floor: PositiveFloat = 1e-6
    # lora
    alpha: PositiveFloat | None = None
    dropout: float = Field(default=0.0, ge=0, lt=1)
    steps: PositiveInt = 100
    lr: PositiveFloat = 1e-4
    max_grad_norm: float = Field(default=QLORA_MAX_GRAD_NORM, ge=0, allow_inf_nan=False)  # 0 disables clipping
    warmup_steps: NonNegativeInt | None = None  # None: about 3 % of steps
    batch_size: PositiveInt = 4
    seed: int = 0
    dataset: CalibrationSpec | None = None

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        registry = lowrank_method_registry()
        if value not in registry:
            raise ValueError(registry.unknown_message(value))
        return value

    @field_validator("targets", "ignore")
    @classmethod
    def _valid_patterns(cls, values: list[str]) -> list[str]:
        return [validate_pattern(v) for v in values]


_COMMON_KEYS = {"method", "targets", "ignore"}


def _check_keys(config: LowRankConfig, locate: Locator) -> None:
    method = lowrank_method_registry().get(config.method)
    # Keys at their defaults pass: a saved recipe.yaml writes every method's keys out.
    for key in sorted(config.keys_off_default() - _COMMON_KEYS - method.keys):
        raise RecipeError(
            f"'{key}' does not apply to method {config.method} (its keys: {', '.join(sorted(method.keys))})",
            **locate(key),
        )
    method.check_config(config, locate)


class LowRankStage:
    def needs_calibration(self, config: LowRankConfig) -> bool:
        method = lowrank_method_registry().get(config.method)
        return method.calibrated and not (config.method == "lora" and config.dataset is not None)

    def batch_data_key(self, config: LowRankConfig) -> str | None:
        """lora trains in batches drawn from its `dataset` (default: the calibration); the others draw none."""
        return "dataset" if "batch_size" in lowrank_method_registry().get(config.method).keys else None

    def plan(self, model, config: LowRankConfig, locate: Locator) -> StagePlan:
        _check_keys(config, locate)
        method = lowrank_method_registry().get(config.method)
        selection = select_modules(model, config.targets, config.ignore)
        plan = StagePlan(
            kind="lowrank", method=config.method, skipped=dict(selection.skipped), notes=selection.notes(config)
        )
        rank = config.rank if config.rank is not None else method.default_rank
        for name, module in selection.selected.items():
            in_features = getattr(module, "in_features", None)
            out_features = getattr(module, "out_features", None)
            if in_features is None or out_features is None:
                continue
            if rank is not None and rank > min(in_features, out_features):
                raise RecipeError(
                    f"rank {rank} is larger than layer {name} allows ({out_features}×{in_features},"
                    f" at most {min(in_features, out_features)})",
                    **locate("rank"),
                )
            verdict = method.plan_module(name, module, config)
            if verdict.selected:
                plan.selected[name] = verdict.detail
            else:
                plan.skipped[name] = verdict.detail
        if not plan.selected:
            raise RecipeError(f"matches no layer that lowrank {config.method} can act on", **locate("targets"))
        return plan

    def run(self, model, config: LowRankConfig, ctx: StageContext, plan: StagePlan):
        method = lowrank_method_registry().get(config.method)
        return method.run(model, config, ctx, plan)
