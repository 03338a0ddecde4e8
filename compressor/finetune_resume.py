"""`compress finetune --save-every N` / `--resume`: step checkpoints of a fine-tune.

Every N optimizer steps the trainable tensors (LoRA A/B, DoRA magnitudes), the optimizer and
schedule states, every process's torch RNG states (LoRA dropout draws from them), the step, the
curves so far and the run key go into ADAPTER's work folder (`.ADAPTER.work/finetune/`, written
by `compressor.training.checkpoints`, the distill stage's format: a `.partial` folder renamed
into place). `--resume` continues after the newest one; together with the data order being a
function of (seed, epoch) (`compressor.finetune_loop`), the result equals an uninterrupted run's.

The run key (`compressor.resume.run_key`, as stage checkpoints use) covers every option that
changes the result, the model's weight files, the datasets' sizes and times, the device, the
process count and the library versions: a checkpoint made otherwise is not resumed from (a
one-line notice, then the run starts over). ADAPTER itself is only ever written whole at the end.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from compressor.training.checkpoints import (
    TrainingState,
    load_training_checkpoint,
    read_training_state,
    save_training_checkpoint,
)
from compressor.training.trainable import TrainableSet

CHECKPOINT_FOLDER = "finetune"
# Options that change where the result goes or what is printed, not what is trained.
NOT_IN_KEY = ("output", "overwrite", "log_every", "merge", "recompress", "save_every", "resume")


def finetune_key(options: dict[str, Any], model_folder: Path | None, device: torch.device, processes: int) -> dict[str, Any]:
    from compressor.calibration.batches import source_fingerprint
    from compressor.resume import run_key

    trained = {k: v for k, v in sorted(options.items()) if k not in NOT_IN_KEY}
    digest = hashlib.sha256(json.dumps({**trained, "processes": processes}, sort_keys=True, default=str).encode()).hexdigest()
    data = [source_fingerprint(options["dataset"])] + ([source_fingerprint(options["eval_dataset"])] if options.get("eval_dataset") else [])
    return run_key(digest, options["model"], model_folder, device, options["batch_size"], data)


def _rng_states() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


@dataclass
class FinetuneCheckpoints:
    workdir: Path
    key: dict[str, Any]
    every: int  # 0: never
    resume: bool
    echo: Callable[[str], None]

    @property
    def folder(self) -> Path:
        return self.workdir / CHECKPOINT_FOLDER

    def kept_note(self) -> str | None:
        """What an interrupted run leaves for --resume, in one line (None: nothing)."""
        state = read_training_state(self.folder)
        if state is None:
            return None
        return f"{self.workdir}: the checkpoint after step {state.step} is kept there; repeat the command with --resume to continue"

    def restore(self, trainable: TrainableSet, optimizer, scheduler, accelerator) -> TrainingState | None:
        """With --resume: load the newest checkpoint into the live objects and RNG; its state, or None."""
        if not self.resume:
            return None
        state = read_training_state(self.folder)
        if state is None:
            self._say(accelerator, f"resume: no step checkpoint in {self.workdir}; training from step 1")
            return None
        if state.extra.get("key") != self.key:
            self._say(accelerator, f"resume: the step checkpoint in {self.workdir} was made with other options, model or data; starting over")
            accelerator.wait_for_everyone()  # every process has read it before it goes
            if accelerator.is_main_process:
                shutil.rmtree(self.folder, ignore_errors=True)
            return None
        restored = load_training_checkpoint(self.folder, trainable, optimizer, scheduler)
        assert restored is not None
        state, rng = restored
        torch.set_rng_state(rng[f"cpu.{accelerator.process_index}"])
        if f"cuda.{accelerator.process_index}" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng[f"cuda.{accelerator.process_index}"])
        self._say(accelerator, f"resume: continuing after step {state.step} from {self.folder}")
        return state

    def save_if_due(self, step: int, steps: int, trainable: TrainableSet, optimizer, scheduler, accelerator,
                    state: TrainingState) -> None:
        if not self.every or step % self.every or step >= steps:
            return
        from accelerate.utils import gather_object

        per_process = gather_object([_rng_states()])  # every process's, in process order
        if accelerator.is_main_process:
            rng = {f"{name}.{index}": value for index, states in enumerate(per_process) for name, value in states.items()}
            save_training_checkpoint(self.folder, trainable, optimizer, scheduler, rng,
                                     TrainingState(step, state.losses, {**state.extra, "key": self.key}))
            self.echo(f"checkpoint after step {step}: {self.folder} ({len(per_process)} RNG states)")
        accelerator.wait_for_everyone()

    def finish(self, accelerator) -> None:
        """After ADAPTER is in place: the checkpoints have served."""
        if accelerator.is_main_process:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _say(self, accelerator, line: str) -> None:
        if accelerator.is_main_process:
            self.echo(line)
