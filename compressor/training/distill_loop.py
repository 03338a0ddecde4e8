"""The distillation loop: the student learns to match a frozen teacher on token windows.

Runs through accelerate (device placement, autocast, gradient accumulation; DDP or DeepSpeed
ZeRO 1 / 2 when launched with `accelerate launch`, see `compressor.training.launch`), keeps
pruning masks and quantized codes intact (see `compressor.training.trainable`), checkpoints
every N steps into the work directory and continues from the last checkpoint when asked to resume.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from compressor.algorithms.distill_losses import LossEntry, LossInputs
from compressor.errors import CompressionError
from compressor.training.checkpoints import TrainingState, load_training_checkpoint, save_training_checkpoint
from compressor.training.launch import Backend, configure_deepspeed, launch_backend, make_accelerator
from compressor.training.trainable import TrainableSet
from compressor.transformers_names import disable_activation_checkpointing, enable_activation_checkpointing

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightedLoss:
    name: str
    entry: LossEntry
    spec: Any  # the recipe's loss block: weight, temperature, beta, layers


@dataclass(frozen=True)
class LoopSettings:
    steps: int
    lr: float
    schedule: str
    warmup_steps: int
    batch_size: int
    gradient_accumulation: int
    gradient_checkpointing: bool
    max_grad_norm: float | None
    weight_decay: float
    checkpoint_every: int | None
    log_every: int
    seed: int
    max_seconds: float | None = None


@dataclass
class LoopResult:
    state: TrainingState
    resumed_from: int = 0
    curve: list[dict[str, float]] = field(default_factory=list)
    stopped_by_time: bool = False
    processes: int = 1
    is_main_process: bool = True
    backend: str = "data_parallel"


def _batch_sampler(windows: torch.Tensor, batch_size: int, generator: torch.Generator) -> Callable[[], torch.Tensor]:
    def sample() -> torch.Tensor:
        # Each batch is drawn from the generator alone, so its state is all a resume needs.
        return windows[torch.randperm(windows.shape[0], generator=generator)[:batch_size]]

    return sample


def _loss_terms(student: nn.Module, teacher: nn.Module | None, ids: torch.Tensor, losses: list[WeightedLoss]) -> dict[str, torch.Tensor]:
    need_hidden = any(item.entry.needs_hidden for item in losses)
    student_out = student(input_ids=ids, use_cache=False, output_hidden_states=need_hidden)
    teacher_out = None
    if teacher is not None:
        with torch.no_grad():
            teacher_out = teacher(input_ids=ids, use_cache=False, output_hidden_states=need_hidden)
    inputs = LossInputs(
        student_logits=student_out.logits,
        teacher_logits=teacher_out.logits if teacher_out is not None else None,
        student_hidden=student_out.hidden_states if need_hidden else None,
        teacher_hidden=teacher_out.hidden_states if need_hidden and teacher_out is not None else None,
        input_ids=ids,
    )
    return {item.name: item.entry.function(inputs, item.spec) * item.spec.weight for item in losses}


def _out_of_time(accelerator, mine: bool) -> bool:
    """Every process stops after the same step (one leaving early would stall the others' all-reduce)."""
    if accelerator.num_processes == 1:
        return mine
    return bool(accelerator.reduce(torch.tensor([float(mine)], device=accelerator.device), reduction="sum").item() > 0)


def _prepare(accelerator, backend: Backend, student: nn.Module, trainable: TrainableSet, settings: LoopSettings):
    """Wrap the student, then build the optimizer over what the wrapped model trains.

    Returns (the model to call, the optimizer to step, the schedule). The schedule drives the plain
    AdamW and is stepped once per optimizer step: accelerate's scheduler wrapper would step it once
    per process, which assumes a schedule counted in per-process batches."""
    from transformers import get_scheduler

    def adamw() -> torch.optim.Optimizer:
        return torch.optim.AdamW(trainable.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)

    def schedule(optimizer: torch.optim.Optimizer):
        return get_scheduler(settings.schedule, optimizer, num_warmup_steps=settings.warmup_steps, num_training_steps=settings.steps)

    if backend == "deepspeed":
        configure_deepspeed(accelerator, batch_size=settings.batch_size, gradient_accumulation=settings.gradient_accumulation,
                            max_grad_norm=settings.max_grad_norm)
        # deepspeed.initialize takes the model and its optimizer in one call; ZeRO 1 / 2 keep the
        # parameter objects and the optimizer's param groups (checked below), so the schedule holds.
        optimizer = adamw()
        scheduler = schedule(optimizer)
        trained, prepared = accelerator.prepare(student, optimizer)
        trainable.check_bound(trained)
        return trained, prepared, scheduler
    trained = accelerator.prepare_model(student) if accelerator.num_processes > 1 else student
    trainable.check_bound(trained)
    optimizer = adamw()
    scheduler = schedule(optimizer)
    return trained, accelerator.prepare_optimizer(optimizer), scheduler


def _backward(accelerator, backend: Backend, loss: torch.Tensor, accumulation: int, last: bool) -> None:
    if backend == "deepspeed":
        # The engine divides by its accumulation count and steps (clips, updates, zeroes) on the last micro-batch.
        accelerator.deepspeed_engine_wrapped.backward(loss, sync_gradients=last)
    else:
        accelerator.backward(loss / accumulation)


def run_distillation(
    student: nn.Module,
    teacher: nn.Module | None,
    windows: torch.Tensor,
    losses: list[WeightedLoss],
    trainable: TrainableSet,
    settings: LoopSettings,
    *,
    checkpoint_dir: Path | None,
    resume: bool,
    show_progress: bool,
    autocast_dtype: torch.dtype | None,
    cpu: bool,
) -> LoopResult:
    from compressor.offload import is_dispatched

    backend = launch_backend(os.environ)
    accelerator = make_accelerator(cpu, backend)
    device = accelerator.device
    student.to(device)
    if teacher is not None:
        if not is_dispatched(teacher):  # an offloaded teacher's hooks already place each block
            teacher.to(device)
        teacher.eval()
    if settings.gradient_checkpointing:
        enable_activation_checkpointing(student)
    trained, optimizer, scheduler = _prepare(accelerator, backend, student, trainable, settings)
    generator = torch.Generator().manual_seed(settings.seed + accelerator.process_index)
    sample = _batch_sampler(windows, settings.batch_size, generator)
    if backend == "deepspeed" and checkpoint_dir is not None and settings.checkpoint_every:
        # ZeRO splits the optimizer state across processes; the checkpoint format holds one whole state.
        logger.warning("distill: no step checkpoints under DeepSpeed; an interrupted stage restarts from its first step")
        checkpoint_dir = None

    state = TrainingState(step=0, losses=[])
    if resume and checkpoint_dir is not None:
        restored = load_training_checkpoint(checkpoint_dir, trainable, optimizer, scheduler)
        if restored is not None:
            state, rng = restored
            generator.set_state(rng["generator"])
    resumed_from = state.step

    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    student.train()
    started = time.monotonic()
    stopped_by_time = False
    progress = tqdm(range(state.step, settings.steps), desc="distilling", unit="step", disable=not show_progress)
    for step in progress:
        totals: dict[str, float] = {}
        # The rate this step uses (DeepSpeed's engine steps inside the last backward, before scheduler.step()).
        lr = scheduler.get_last_lr()[0]
        for micro in range(settings.gradient_accumulation):
            # Gradients are averaged across processes only on the last micro-batch.
            last = micro == settings.gradient_accumulation - 1
            with (nullcontext() if last or backend == "deepspeed" else accelerator.no_sync(trained)):
                with autocast:
                    terms = _loss_terms(trained, teacher, sample().to(device), losses)
                    loss = torch.stack(list(terms.values())).sum()
                if not torch.isfinite(loss):
                    raise CompressionError(f"distillation loss became {loss.item()} at step {step + 1}; lower lr")
                _backward(accelerator, backend, loss, settings.gradient_accumulation, last)
            for name, value in terms.items():
                totals[name] = totals.get(name, 0.0) + value.item() / settings.gradient_accumulation
        if accelerator.num_processes > 1:  # the curve is the mean over processes, the same in each
            means = accelerator.reduce(torch.tensor(list(totals.values()), device=device), reduction="mean")
            totals = dict(zip(totals, means.tolist()))
        if settings.max_grad_norm is not None and backend != "deepspeed":  # DeepSpeed clips in its engine
            accelerator.clip_grad_norm_(trainable.parameters(), settings.max_grad_norm)
        optimizer.step()  # under DeepSpeed a no-op: the engine stepped in the last backward
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        trainable.apply_masks()
        record = {"step": step + 1, "loss": sum(totals.values()), "lr": lr, **totals}
        state.losses.append(record)
        state.step = step + 1
        if (step + 1) % settings.log_every == 0:
            progress.set_postfix(loss=f"{record['loss']:.4f}")
        every = settings.checkpoint_every
        if checkpoint_dir is not None and every and state.step % every == 0 and state.step < settings.steps:
            if accelerator.is_main_process:
                save_training_checkpoint(checkpoint_dir, trainable, optimizer, scheduler, {"generator": generator.get_state()}, state)
            accelerator.wait_for_everyone()
        if settings.max_seconds is not None and _out_of_time(accelerator, time.monotonic() - started >= settings.max_seconds):
            stopped_by_time = state.step < settings.steps
            break
    student.eval()
    if settings.gradient_checkpointing:
        disable_activation_checkpointing(student)
    # Data-parallel and ZeRO 1 / 2 keep every parameter whole on every process, so `student` (the
    # unwrapped model the pipeline saves from the main process) already holds the full trained state.
    accelerator.wait_for_everyone()
    return LoopResult(state=state, resumed_from=resumed_from, curve=state.losses, stopped_by_time=stopped_by_time,
                      processes=accelerator.num_processes, is_main_process=accelerator.is_main_process, backend=backend)


def plot_loss_curve(curve: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in curve]
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(steps, [row["loss"] for row in curve], label="total", linewidth=2)
    terms = [key for key in curve[0] if key not in ("step", "loss", "lr")] if curve else []
    if len(terms) > 1:
        for term in terms:
            axis.plot(steps, [row[term] for row in curve], label=term, alpha=0.7)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
