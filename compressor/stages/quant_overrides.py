"""Mixed precision inside one `quantize` stage: `overrides` rules by module name.

    overrides:
      - {targets: ["re:.*down_proj"], weights: {bits: 8}}          # these layers at 8 bits
      - {targets: ["re:model\\.layers\\.(0|29)\\..*"], skip: true}  # first and last block untouched

A rule's `weights` keys replace the stage's `weights` keys that it names (others are kept).
Each module may be claimed by at most one rule: two rules matching the same module are a
recipe error naming both rules, found at plan time (so `--dry-run` reports it). A rule that
claims no module the stage would quantize is an error too (a typo, most likely).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pydantic import Field, field_validator, model_validator
from torch import nn

from compressor.errors import RecipeError
from compressor.recipe import StrictModel
from compressor.targets import first_match, validate_pattern


class OverrideRule(StrictModel):
    targets: list[str] = Field(min_length=1)
    weights: Any = None  # validated as the stage's WeightArgs class by QuantizeConfig
    skip: bool = False

    @field_validator("targets")
    @classmethod
    def _valid_patterns(cls, values: list[str]) -> list[str]:
        return [validate_pattern(v) for v in values]

    @model_validator(mode="after")
    def _one_effect(self) -> "OverrideRule":
        if self.skip and self.weights is not None:
            raise ValueError("a rule either skips its modules or sets their weights, not both")
        if not self.skip and self.weights is None:
            raise ValueError("a rule needs `weights: {...}` or `skip: true`")
        return self


@dataclass(frozen=True)
class RuleChoice:
    """What the rules decide for one module: the rule index (or None) and its effect."""

    rule: int | None
    weights: Any  # the module's WeightArgs, or None when the rule skips it


def merged_weights(base: Any, override: Any) -> Any:
    """`base` with the keys the user wrote in `override` replaced."""
    return base.model_copy(update={key: getattr(override, key) for key in override.model_fields_set})


def resolve_rules(
    modules: dict[str, nn.Module],
    rules: list[OverrideRule],
    base_weights: Any,
    locate: Callable[..., dict[str, str]] | None,
) -> dict[str, RuleChoice]:
    """The rule choice for each module; RecipeError on overlap or on a rule that claims nothing."""
    choices: dict[str, RuleChoice] = {}
    claimed = [0] * len(rules)
    for name, module in modules.items():
        hits = [i for i, rule in enumerate(rules) if first_match(rule.targets, name, module) is not None]
        if len(hits) > 1 and locate is not None:
            first, second = locate("overrides", hits[0]), locate("overrides", hits[1])
            raise RecipeError(
                f"rules overrides[{hits[0]}] ({first['where']} {first['key']}) and overrides[{hits[1]}] "
                f"({second['where']} {second['key']}) both claim module {name}; make the rules disjoint",
                **second,
            )
        if not hits:
            choices[name] = RuleChoice(None, base_weights)
            continue
        rule = rules[hits[0]]
        claimed[hits[0]] += 1
        choices[name] = RuleChoice(hits[0], None if rule.skip else merged_weights(base_weights, rule.weights))
    if locate is not None:
        for index, count in enumerate(claimed):
            if count == 0:
                raise RecipeError(
                    "matches no module this stage quantizes (check the names with --dry-run)",
                    **locate("overrides", index, "targets"),
                )
    return choices
