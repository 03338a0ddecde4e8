"""Running a `distill` stage: data, teacher, trainable set, the loop, and what it leaves behind."""

from __future__ import annotations

import json

import torch
from torch import nn

from compressor.algorithms.distill_losses import loss_registry
from compressor.cache import cache_root
from compressor.errors import CompressionError
from compressor.stages.base import StageContext, StagePlan
from compressor.stages.distill import DistillConfig, LossSpec, default_layer_pairs, depth_mismatch_message
from compressor.training.distill_loop import LoopSettings, WeightedLoss, plot_loss_curve, run_distillation
from compressor.training.lora_trainable import select_lora_trainable
from compressor.training.trainable import TrainableSet, select_trainable


def _windows(config: DistillConfig, ctx: StageContext) -> torch.Tensor:
    if config.data is None:
        return ctx.calibration()
    from compressor.calibration.batches import build_calibration

    return build_calibration(config.data, ctx.tokenizer, cache_root() / "calibration")


def _teacher(config: DistillConfig, ctx: StageContext) -> nn.Module:
    if config.teacher == "base":
        if ctx.load_reference_model is None:
            raise CompressionError("this run cannot provide the base model as a teacher")
        teacher = ctx.load_reference_model()
    else:
        from compressor.model_io import load_model

        teacher = load_model(config.teacher, allow_pickle=False, trust_remote_code=False).model
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


def _depth(model: nn.Module | None) -> int | None:
    return getattr(getattr(model, "config", None), "num_hidden_layers", None)


def _with_layers(spec: LossSpec, student: nn.Module, teacher: nn.Module | None) -> LossSpec:
    """A hidden loss without `layers` gets every block 1:1, from the depths as they are now
    (an earlier stage may have dropped blocks since the plan was made)."""
    if spec.layers is not None or not loss_registry().get(spec.kind).needs_hidden:
        return spec
    pairs = default_layer_pairs(_depth(student), _depth(teacher))
    if pairs is None:
        raise CompressionError(depth_mismatch_message(spec.kind, _depth(student), _depth(teacher)))
    return spec.model_copy(update={"layers": pairs})


def _weighted_losses(config: DistillConfig, student: nn.Module, teacher: nn.Module | None) -> list[WeightedLoss]:
    registry = loss_registry()
    specs = [_with_layers(spec, student, teacher) for spec in config.losses()]
    names = [spec.kind if [s.kind for s in specs].count(spec.kind) == 1 else f"{spec.kind}{i}" for i, spec in enumerate(specs)]
    return [WeightedLoss(name, registry.get(spec.kind), spec) for name, spec in zip(names, specs)]


def _trainable(model: nn.Module, config: DistillConfig, plan: StagePlan) -> TrainableSet:
    if config.train == "lora":
        with torch.random.fork_rng(devices=[]):  # LoRA's A starts random: the recipe's seed decides it
            torch.manual_seed(config.seed)
            return select_lora_trainable(model, list(plan.selected), rank=config.rank, alpha=config.lora_alpha, dropout=config.dropout)
    return select_trainable(model, config.train, config.ignore)


def distill_model(model: nn.Module, config: DistillConfig, ctx: StageContext, plan: StagePlan) -> nn.Module:
    registry = loss_registry()
    needs_teacher = any(registry.get(spec.kind).needs_teacher for spec in config.losses())
    windows = _windows(config, ctx)
    teacher = _teacher(config, ctx) if needs_teacher else None
    losses = _weighted_losses(config, model, teacher)
    model_dtype = next(model.parameters()).dtype
    trainable = _trainable(model, config, plan)
    if not trainable.named:
        raise CompressionError(f"distill `train: {config.train}` found nothing to train (no quantized layers before it?)")
    settings = LoopSettings(
        steps=config.steps,
        lr=config.lr,
        schedule=config.schedule,
        warmup_steps=config.warmup_steps,
        batch_size=config.batch_size,
        gradient_accumulation=config.gradient_accumulation,
        gradient_checkpointing=config.gradient_checkpointing,
        max_grad_norm=config.max_grad_norm,
        weight_decay=config.weight_decay,
        checkpoint_every=config.checkpoint_every,
        log_every=config.log_every,
        seed=config.seed,
        max_seconds=config.max_minutes * 60 if config.max_minutes is not None else None,
    )
    label = f"stage-{ctx.stage_index + 1}-distill"
    checkpoint_dir = ctx.workdir / label if ctx.workdir is not None else None
    try:
        result = run_distillation(
            model,
            teacher,
            windows,
            losses,
            trainable,
            settings,
            checkpoint_dir=checkpoint_dir,
            resume=ctx.resume,
            show_progress=ctx.show_progress,
            # Low-precision models compute in their dtype; trainable tensors stay fp32 masters.
            autocast_dtype=model_dtype if model_dtype in (torch.bfloat16, torch.float16) else None,
            cpu=ctx.device.type == "cpu",
        )
    finally:
        trainable.finish()
        del teacher
    if ctx.workdir is not None and result.is_main_process:
        artifacts = ctx.workdir / "artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        log = {"resumed_from_step": result.resumed_from, "steps": result.state.step,
               "stopped_by_time": result.stopped_by_time, "curve": result.curve}
        (artifacts / f"{label}.json").write_text(json.dumps(log, indent=1) + "\n")
        plot_loss_curve(result.curve, artifacts / f"{label}-loss.png", f"distillation ({', '.join(l.name for l in losses)})")
        ctx.artifacts[f"{label}-loss.png"] = artifacts / f"{label}-loss.png"
        ctx.artifacts[f"{label}.json"] = artifacts / f"{label}.json"
    first, last = result.curve[0]["loss"], result.curve[-1]["loss"]
    ctx.notes[label] = {"steps": result.state.step, "first_loss": first, "last_loss": last, "resumed_from": result.resumed_from,
                        "stopped_by_time": result.stopped_by_time, "processes": result.processes,
                        "backend": result.backend}
    return model
