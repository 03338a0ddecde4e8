"""The `distill` stage: recover what compression lost by matching a frozen teacher.

Recipe block::

    - distill:
        teacher: base                 # the model as loaded before any stage, or a model id/path
        loss: {kind: kl, temperature: 2.0}      # or a list: [{kind: kl, weight: 1}, {kind: ce, weight: 0.1}]
        steps: 200
        lr: 1.0e-5
        schedule: cosine              # constant | linear | cosine (+ warmup_steps)
        batch_size: 4
        gradient_accumulation: 1
        gradient_checkpointing: false
        train: auto                   # auto | unquantized | scales | lora (see compressor.training.trainable)
        rank: 32                      # train: lora only, like the lowrank stage: rank, alpha (2 × rank),
        alpha: null                   #   dropout, targets (module classes or re:<regex>; `ignore` applies)
        data: null                    # a calibration block of its own; default: the recipe's calibration
        checkpoint_every: 50          # resumable with `compress ... --resume`
        max_minutes: null             # wall-time budget: stop after the step that passes it

Losses: kl, reverse_kl, jsd (with beta), ce, mse_hidden / cosine_hidden (optional layers:
[[student, teacher], ...] indices into hidden_states: 0 is the embeddings, i the output of block i).
Without `layers`, a hidden loss pairs every block's output 1:1 ([[1, 1], ..., [N, N]], as
layer-wise distillation does with one target per decoder layer); that needs a teacher of the
same depth, and a teacher of another depth needs `layers`.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, NonNegativeInt, PositiveInt, field_validator, model_validator
from torch import nn

from compressor.algorithms.distill_losses import loss_registry
from compressor.errors import ModelError, RecipeError
from compressor.recipe import CalibrationSpec, StrictModel
from compressor.stages.base import EarlierQuantization, Locator, StageContext, StagePlan
from compressor.kernels.quant_linear import QuantLinear
from compressor.targets import select_modules, validate_pattern
from compressor.training.launch import check_launch
from compressor.training.trainable import TRAIN_MODES, describe_trainable

_LOGIT_LOSSES = {"kl", "reverse_kl", "jsd"}
_HIDDEN_LOSSES = {"mse_hidden", "cosine_hidden"}


class LossSpec(StrictModel):
    kind: str
    weight: float = Field(default=1.0, gt=0)
    temperature: float = Field(default=1.0, gt=0)
    beta: float = Field(default=0.5, gt=0, lt=1)
    layers: list[list[int]] | None = None

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        registry = loss_registry()
        if value not in registry:
            raise ValueError(registry.unknown_message(value))
        return value

    @field_validator("layers")
    @classmethod
    def _pairs(cls, value: list[list[int]] | None) -> list[list[int]] | None:
        if value is not None:
            if not value:
                raise ValueError("give at least one [student_layer, teacher_layer] pair")
            for pair in value:
                if len(pair) != 2:
                    raise ValueError(f"each entry is a [student_layer, teacher_layer] pair, got {pair}")
        return value

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> "LossSpec":
        given = self.keys_off_default()  # a saved recipe.yaml writes `layers: null`, `beta: 0.5` under kl
        if self.kind not in _HIDDEN_LOSSES and "layers" in given:
            raise ValueError(f"`layers` applies to mse_hidden and cosine_hidden, not '{self.kind}'")
        if "temperature" in given and self.kind not in _LOGIT_LOSSES:
            raise ValueError(f"`temperature` applies to kl, reverse_kl and jsd, not '{self.kind}'")
        if "beta" in given and self.kind != "jsd":
            raise ValueError(f"`beta` applies to jsd, not '{self.kind}'")
        return self


class DistillConfig(StrictModel):
    teacher: str = "base"
    loss: LossSpec | list[LossSpec] = Field(default_factory=lambda: LossSpec(kind="kl"))
    steps: PositiveInt = 100
    lr: float = Field(default=1e-5, gt=0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: NonNegativeInt = 0
    batch_size: PositiveInt = 4
    gradient_accumulation: PositiveInt = 1
    gradient_checkpointing: bool = False
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    train: Literal[TRAIN_MODES] = "auto"  # type: ignore[valid-type]
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    data: CalibrationSpec | None = None
    checkpoint_every: PositiveInt | None = 50
    log_every: PositiveInt = 10
    seed: NonNegativeInt = 0
    # A budget for shared or slow machines; the schedule still spans `steps`, so size `steps` to fit it.
    max_minutes: float | None = Field(default=None, gt=0)
    # train: lora (the lowrank stage's names and defaults)
    rank: PositiveInt = 32
    alpha: float | None = Field(default=None, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    targets: list[str] = Field(default_factory=lambda: ["Linear", "QuantLinear"], min_length=1)

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.rank

    @field_validator("ignore", "targets")
    @classmethod
    def _patterns(cls, values: list[str]) -> list[str]:
        return [validate_pattern(v) for v in values]

    @field_validator("loss", mode="before")
    @classmethod
    def _not_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("give at least one loss")
        return value

    def losses(self) -> list[LossSpec]:
        return self.loss if isinstance(self.loss, list) else [self.loss]

    def loss_path(self, index: int) -> tuple:
        return ("loss", index) if isinstance(self.loss, list) else ("loss",)

    @model_validator(mode="after")
    def _warmup_fits(self) -> "DistillConfig":
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be fewer than steps ({self.steps})")
        return self


def default_layer_pairs(student_depth: int | None, teacher_depth: int | None) -> list[list[int]] | None:
    """A hidden loss without `layers`: every block's output 1:1 (the embeddings, index 0, are
    left out: no stage compresses them). None when the depths differ or are unknown."""
    if student_depth is None or student_depth != teacher_depth:
        return None
    return [[i, i] for i in range(1, student_depth + 1)]


def depth_mismatch_message(kind: str, student_depth: int | None, teacher_depth: int | None) -> str:
    return (
        f"loss '{kind}' without `layers` pairs every block 1:1, but the model has {student_depth} blocks and"
        f" the teacher {teacher_depth}: give `layers: [[student, teacher], ...]`"
    )


def _check_layers(model: nn.Module, teacher_depth: int | None, config: DistillConfig, locate: Locator) -> None:
    count = getattr(model.config, "num_hidden_layers", None)
    for index, spec in enumerate(config.losses()):
        where = config.loss_path(index)
        if spec.kind in _HIDDEN_LOSSES and spec.layers is None:
            if default_layer_pairs(count, teacher_depth) is None:
                raise RecipeError(depth_mismatch_message(spec.kind, count, teacher_depth), **locate(*where))
            continue
        for student_layer, teacher_layer in spec.layers or []:
            for layer, depth, whose in ((student_layer, count, "model"), (teacher_layer, teacher_depth, "teacher")):
                if depth is not None and not 0 <= layer <= depth:
                    raise RecipeError(
                        f"hidden-state index {layer} is out of range for the {whose} (0 = embeddings … {depth} = last block)",
                        **locate(*where, "layers"),
                    )


def _check_hidden_width(model: nn.Module, teacher_width: int | None, config: DistillConfig, locate: Locator) -> None:
    """Hidden losses compare states element by element (no projection is learned): same width."""
    width = getattr(model.config, "hidden_size", None)
    for index, spec in enumerate(config.losses()):
        if spec.kind in _HIDDEN_LOSSES and None not in (width, teacher_width) and width != teacher_width:
            raise RecipeError(
                f"loss '{spec.kind}' compares hidden states element by element, but the model's hidden size is"
                f" {width} and the teacher's {teacher_width}: use a logit loss (kl, reverse_kl, jsd) or a teacher of the same width",
                **locate(*config.loss_path(index)),
            )


def _teacher_depth(model: nn.Module, config: DistillConfig, locate: Locator) -> int | None:
    """The teacher's number of blocks, after checking that it shares the model's vocabulary (and
    its width, for hidden-state losses)."""
    if config.teacher == "base":
        return getattr(model.config, "num_hidden_layers", None)
    from compressor.model_io import load_config, prepare_source

    try:
        _, path, _ = prepare_source(config.teacher, allow_pickle=False)
        teacher_config = load_config(path, config.teacher, False)
    except ModelError as err:  # the recipe line names the teacher; the message says what is wrong with it
        raise RecipeError(f"teacher '{config.teacher}': {err.message}", **locate("teacher")) from None
    ours, theirs = getattr(model.config, "vocab_size", None), getattr(teacher_config, "vocab_size", None)
    if ours != theirs:
        raise RecipeError(
            f"teacher '{config.teacher}' has a different vocabulary ({theirs} tokens, the model has {ours})",
            **locate("teacher"),
        )
    _check_same_tokens(getattr(model.config, "_name_or_path", ""), path, config.teacher, ours, locate)
    _check_hidden_width(model, getattr(teacher_config, "hidden_size", None), config, locate)
    return getattr(teacher_config, "num_hidden_layers", None)


def _token_ids(path: str, rows: int | None) -> dict[str, int] | None:
    """Token → id for the ids that have a logit row (transformers may append tokens past them)."""
    from transformers import AutoTokenizer

    try:
        vocab = AutoTokenizer.from_pretrained(path).get_vocab()
    except (OSError, ValueError):
        return None
    return {token: i for token, i in vocab.items() if rows is None or i < rows}


def _check_same_tokens(model_path: str, teacher_path: str, teacher: str, rows: int | None, locate: Locator) -> None:
    """The losses compare logits id by id, so both tokenizers must give every token the same id
    (the same vocabulary size alone is not enough: two BPE vocabularies of one size differ)."""
    ours = _token_ids(model_path, rows) if model_path else None
    if ours is None:  # no tokenizer beside the model's config: nothing to compare with
        return
    theirs = _token_ids(teacher_path, rows)
    if theirs is None:
        raise RecipeError(f"teacher '{teacher}' has no tokenizer to compare with the model's", **locate("teacher"))
    differing = sorted(t for t in ours.keys() | theirs.keys() if ours.get(t) != theirs.get(t))
    if differing:
        token = differing[0]
        raise RecipeError(
            f"teacher '{teacher}' has a different tokenizer ({len(differing)} tokens differ, e.g. {token!r} is id"
            f" {ours.get(token)} in the model's and {theirs.get(token)} in the teacher's); the losses compare logits id by id",
            **locate("teacher"),
        )


_LORA_KEYS = ("rank", "alpha", "dropout", "targets")

def lora_targets(model: nn.Module, config: DistillConfig, locate: Locator) -> dict[str, str]:
    """`train: lora`: the Linear / QuantLinear layers the adapters go on, with a detail each."""
    selection = select_modules(model, config.targets, config.ignore)
    chosen = {}
    for name, module in selection.selected.items():
        if not isinstance(module, (nn.Linear, QuantLinear)):
            continue
        if config.rank > min(module.in_features, module.out_features):
            raise RecipeError(
                f"rank {config.rank} is larger than layer {name} allows ({module.out_features}×{module.in_features},"
                f" at most {min(module.in_features, module.out_features)})",
                **locate("rank"),
            )
        chosen[name] = f"LoRA rank {config.rank} on {type(module).__name__}"
    if not chosen:
        raise RecipeError("`targets` matches no Linear or QuantLinear layer for LoRA", **locate("targets"))
    return chosen


def _check_lora_keys(config: DistillConfig, locate: Locator) -> None:
    if config.train == "lora":
        return
    given = config.keys_off_default()  # a saved recipe.yaml writes `rank: 32` etc. for every train mode
    for key in _LORA_KEYS:
        if key in given:
            raise RecipeError(f"'{key}' applies to `train: lora`, not `train: {config.train}`", **locate(key))


# The plan sees the model as loaded: a Linear listed as `weight` may be quantized by an earlier stage.
_AFTER_QUANTIZE = {"auto": "or its scales if an earlier stage quantizes it", "unquantized": "unless an earlier stage quantizes it"}


def _as_it_may_be(selected: dict[str, str], train: str) -> dict[str, str]:
    note = _AFTER_QUANTIZE.get(train)
    if note is None:
        return selected
    return {name: f"{what}, {note}" if what.startswith("weight") else what for name, what in selected.items()}


def _scales(earlier: EarlierQuantization) -> str:
    return "scales, zero points" if "asym" in earlier.scheme.split() else "scales"


def _frozen_reason(earlier: EarlierQuantization, train: str) -> str:
    if train == "unquantized":
        return f"frozen: stage {earlier.stage} quantizes it ({earlier.scheme}), and `train: unquantized` trains no quantized layer"
    return f"frozen: stage {earlier.stage} makes it a {earlier.layer_class} ({earlier.scheme}), which has no scales to train"


def _lora_after_quantization(plan: StagePlan, config: DistillConfig, quantized: dict[str, EarlierQuantization]) -> None:
    for name in list(plan.selected):
        earlier = quantized.get(name)
        if earlier is None:
            continue
        if earlier.layer_class == "W8A8Linear":  # lora_targets takes Linear and QuantLinear layers only
            del plan.selected[name]
            plan.skipped[name] = f"stage {earlier.stage} makes it a W8A8Linear ({earlier.scheme}), which LoRA does not wrap"
        else:
            plan.selected[name] = (f"LoRA rank {config.rank} on the {earlier.layer_class} that stage {earlier.stage} makes"
                                   f" ({earlier.scheme}; its weights stay frozen)")


def _refuse_scales_with_nothing_to_train(plan: StagePlan, config: DistillConfig, locate: Locator) -> None:
    """`train: scales` on a model where no earlier stage makes a QuantLinear would fail when the
    stage starts, after every stage before it has run: refuse it when the recipe is planned."""
    if config.train == "scales" and not plan.selected:
        raise RecipeError(
            "`train: scales` trains the scales of quantized layers, and no earlier quantize stage makes a"
            " QuantLinear of any layer it may train (W8A8, FP8 and NF4 layers have no scales of ours): put an"
            " integer weight-only quantize stage before it, or use `train: lora`",
            **locate("train"),
        )


class DistillStage:
    def needs_calibration(self, config: DistillConfig) -> bool:
        return config.data is None

    def batch_data_key(self, config: DistillConfig) -> str | None:
        """The key of its own dataset block: training batches come from it, else from the calibration."""
        return "data"

    def describe_after_quantization(self, plan: StagePlan, config: DistillConfig, model: nn.Module,
                                    quantized: dict[str, EarlierQuantization], locate: Locator) -> None:
        """What trains on the layers earlier quantize stages replace, as select_trainable will
        decide on the quantized model: a QuantLinear trains its scales (and zero points), never
        its integer codes; a layer with no scales of ours stays frozen; `lora` wraps the layer.
        Called for every distill stage, with `quantized` empty when no quantize stage precedes it."""
        if getattr(model.config, "quantization_config", None) is not None:
            return  # compressed as loaded: the plan's skeleton cannot tell which layers are
        if config.train == "lora":
            _lora_after_quantization(plan, config, quantized)
            return
        if not quantized:
            _refuse_scales_with_nothing_to_train(plan, config, locate)
            return
        plan.selected.clear()
        for name, what in describe_trainable(model, "auto", config.ignore).items():
            earlier = quantized.get(name)
            if earlier is None:
                if config.train != "scales":
                    plan.selected[name] = what
            elif earlier.layer_class == "QuantLinear" and config.train != "unquantized":
                plan.selected[name] = (f"{_scales(earlier)} of the {earlier.scheme} layer that stage {earlier.stage} makes"
                                       " (its integer codes stay frozen)")
            else:
                plan.skipped[name] = _frozen_reason(earlier, config.train)
        _refuse_scales_with_nothing_to_train(plan, config, locate)

    def plan(self, model: nn.Module, config: DistillConfig, locate: Locator) -> StagePlan:
        check_launch(os.environ)  # before any weight is read
        _check_lora_keys(config, locate)
        _check_layers(model, _teacher_depth(model, config, locate), config, locate)
        method = "+".join(s.kind for s in config.losses())
        if config.train == "lora":
            return StagePlan(kind="distill", method=method, selected=lora_targets(model, config, locate))
        selected = _as_it_may_be(describe_trainable(model, config.train, config.ignore), config.train)
        # Before the stages run there are no quantized layers yet: `scales` is checked again at run time.
        if not selected and config.train != "scales":
            raise RecipeError(f"`train: {config.train}` finds nothing to train in this model", **locate("train"))
        return StagePlan(kind="distill", method=method, selected=selected)

    def run(self, model: nn.Module, config: DistillConfig, ctx: StageContext, plan: StagePlan) -> nn.Module:
        from compressor.stages.distill_run import distill_model

        return distill_model(model, config, ctx, plan)
