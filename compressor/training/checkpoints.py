"""Resumable training state in the work directory: trainable tensors, optimizer, schedule, RNG.

Tensors go to safetensors; the optimizer and scheduler state dicts hold only tensors and
numbers, so they are written with `torch.save` and read back with `weights_only=True`, which
cannot run code. A checkpoint is written to a temporary name and renamed, so a kill while
saving leaves the previous checkpoint intact.

Used by the distill stage (`checkpoint_every`) and by `compress finetune --save-every`; each
names the random-number states it needs restored (`rng`: name → state tensor).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from compressor.training.trainable import TrainableSet

STATE_FILE = "state.json"


@dataclass
class TrainingState:
    step: int
    losses: list[dict[str, float]]
    extra: dict[str, Any] = field(default_factory=dict)  # JSON the loop keeps besides the curve


def save_training_checkpoint(folder: Path, trainable: TrainableSet, optimizer, scheduler, rng: dict[str, torch.Tensor],
                             state: TrainingState) -> None:
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file({name: p.detach().contiguous().cpu() for name, p in trainable.named.items()}, str(partial / "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, partial / "optimizer.pt")
    save_file({name: value.contiguous() for name, value in rng.items()}, str(partial / "rng.safetensors"))
    (partial / STATE_FILE).write_text(json.dumps({"step": state.step, "losses": state.losses, "extra": state.extra}))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(partial, folder)


def read_training_state(folder: Path) -> TrainingState | None:
    """The step, curve and extra record of a checkpoint, without touching any tensor (None: none)."""
    if not (folder / STATE_FILE).is_file():
        return None
    state = json.loads((folder / STATE_FILE).read_text())
    return TrainingState(step=int(state["step"]), losses=list(state["losses"]), extra=dict(state.get("extra") or {}))


def load_training_checkpoint(folder: Path, trainable: TrainableSet, optimizer, scheduler
                             ) -> tuple[TrainingState, dict[str, torch.Tensor]] | None:
    """Restore the tensors, optimizer and schedule of a checkpoint written by
    `save_training_checkpoint`; returns its state and RNG states (the caller restores those), or
    None when there is none."""
    state = read_training_state(folder)
    if state is None:
        return None
    tensors = load_file(str(folder / "trainable.safetensors"))
    if set(tensors) != set(trainable.named):
        raise RuntimeError(f"the checkpoint in {folder} was written for different trainable tensors")
    with torch.no_grad():
        for name, parameter in trainable.named.items():
            parameter.copy_(tensors[name])
    saved: dict[str, Any] = torch.load(folder / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return state, load_file(str(folder / "rng.safetensors"))
