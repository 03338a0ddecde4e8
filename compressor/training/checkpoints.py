"""Resumable training state in the work directory: trainable tensors, optimizer, schedule, RNG.

Tensors go to safetensors; the optimizer and scheduler state dicts hold only tensors and
numbers, so they are written with `torch.save` and read back with `weights_only=True`, which
cannot run code. A checkpoint is written to a temporary name and renamed, so a kill while
saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from compressor.training.trainable import TrainableSet


@dataclass
class TrainingState:
    step: int
    losses: list[dict[str, float]]


def save_training_checkpoint(folder: Path, trainable: TrainableSet, optimizer, scheduler, generator: torch.Generator, state: TrainingState) -> None:
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file({name: p.detach().contiguous().cpu() for name, p in trainable.named.items()}, str(partial / "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, partial / "optimizer.pt")
    save_file({"generator": generator.get_state()}, str(partial / "rng.safetensors"))
    (partial / "state.json").write_text(json.dumps({"step": state.step, "losses": state.losses}))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(partial, folder)


def load_training_checkpoint(folder: Path, trainable: TrainableSet, optimizer, scheduler, generator: torch.Generator) -> TrainingState | None:
    """Restore a checkpoint written by `save_training_checkpoint`; None when there is none."""
    if not (folder / "state.json").is_file():
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
    generator.set_state(load_file(str(folder / "rng.safetensors"))["generator"])
    state = json.loads((folder / "state.json").read_text())
    return TrainingState(step=int(state["step"]), losses=list(state["losses"]))
