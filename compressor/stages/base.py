"""What every stage receives and returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from pydantic import BaseModel
from torch import nn


@dataclass
class StageContext:
    """Shared services for stages: tokenizer, calibration data, device, progress, records."""

    tokenizer: Any
    calibration: Callable[[], torch.Tensor]  # [samples, seq_len] token windows, built on first use
    device: torch.device
    batch_size: int = 8
    show_progress: bool = True
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # module name → what was done
    notes: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage label → summary (compression.json)
    workdir: Path | None = None  # stage checkpoints for --resume; removed after a successful save
    resume: bool = False
    stage_index: int = 0  # set by the pipeline before each stage runs
    locate: Locator | None = None  # the running stage's keys in the recipe file (errors found at run time)
    load_reference_model: Callable[[], nn.Module] | None = None  # a fresh copy of the model as loaded
    artifacts: dict[str, Path] = field(default_factory=dict)  # file name in OUT → file to copy there


@dataclass
class StagePlan:
    """What a stage will do to a model: chosen modules (with a detail each) and skipped ones."""

    kind: str
    method: str
    selected: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # warnings about the recipe, printed with the plan
    unit: str = "modules"  # what `selected` names (a merge selects input models)


@dataclass(frozen=True)
class EarlierQuantization:
    """How an earlier quantize stage replaces a layer that a later stage's plan saw as Linear."""

    stage: int  # 1-based, as `--dry-run` numbers the stages
    scheme: str  # that stage's plan detail: "int4 sym group 32"
    layer_class: str  # what the layer becomes: QuantLinear, W8A8Linear, Linear4bit


Locator = Callable[..., dict[str, str]]
"""`locate("targets")` → ``{"where": "recipe.yaml:7", "key": "stages[0].quantize.targets"}``."""


class Stage(Protocol):
    def needs_calibration(self, config: BaseModel) -> bool:
        """Whether the stage reads calibration data (checked before the model loads)."""

    def plan(self, model: nn.Module, config: BaseModel, locate: Locator) -> StagePlan:
        """Validate the stage against `model` and list its targets; raises UserError."""

    def run(self, model: nn.Module, config: BaseModel, ctx: StageContext, plan: StagePlan) -> nn.Module:
        """Apply the stage and return the model (the same object, changed in place)."""


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
