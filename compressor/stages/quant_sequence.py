"""Rules across quantize stages of one recipe, checked with every stage's plan (so `--dry-run`
reports them before any weight is read):

- an ``nf4`` stage's layers are bitsandbytes layers: no later stage may quantize them again,
  and no other quantize stage may share the recipe (one checkpoint holds one serialization:
  bitsandbytes or compressed-tensors);
- a SmoothQuant stage that only smooths (``activations: null``) must be followed by stages
  that quantize the activations of every module it smoothed; smoothing alone only moves
  the activations' range into the weights.
"""

from __future__ import annotations

from typing import Any

from compressor.errors import RecipeError
from compressor.stages.base import StagePlan
from compressor.stages.quant_schemes import smooths_only


def _label(index: int, config: Any) -> str:
    return f"stages[{index}] (quantize {config.method})"


def _few(names: set[str]) -> str:
    ordered = sorted(names)
    return ", ".join(ordered[:3]) + (f" and {len(ordered) - 3} more" if len(ordered) > 3 else "")


def _check_nf4(stages: list[tuple[int, Any, StagePlan]], recipe) -> None:
    for position, (i, config, plan) in enumerate(stages):
        if config.method != "nf4":
            continue
        for j, other, other_plan in stages:
            if j == i:
                continue
            shared = set(plan.selected) & set(other_plan.selected)
            if j > i and shared:
                reason = f"{_label(j, other)} quantizes modules that {_label(i, config)} already made NF4 ({_few(shared)})"
            else:
                reason = (
                    f"{_label(i, config)} and {_label(j, other)} cannot share one checkpoint: NF4 is saved in the"
                    " bitsandbytes serialization, other methods in compressed-tensors"
                )
            raise RecipeError(reason, **recipe.where(("stages", max(i, j), "quantize", "method")))


def _check_smoothing(stages: list[tuple[int, Any, StagePlan]], recipe) -> None:
    for i, config, plan in stages:
        if not smooths_only(config):
            continue
        covered: set[str] = set()
        for j, other, other_plan in stages:
            if j > i and other.activations is not None:
                covered |= set(other_plan.selected)
        missing = set(plan.selected) - covered
        if missing:
            raise RecipeError(
                f"{_label(i, config)} only smooths (activations: null) but no later stage quantizes the activations of"
                f" {_few(missing)}; set activations here or in a later quantize stage",
                **recipe.where(("stages", i, "quantize", "activations")),
            )


def check_quantize_sequence(recipe, plans: dict[int, StagePlan]) -> None:
    """Raise RecipeError when the recipe's quantize stages do not fit together (`plans` by stage index)."""
    stages = [(i, spec.config, plans[i]) for i, spec in enumerate(recipe.stages) if spec.kind == "quantize" and i in plans]
    _check_nf4(stages, recipe)
    _check_smoothing(stages, recipe)
