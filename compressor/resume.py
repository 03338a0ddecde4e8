"""Stage checkpoints: `--resume` continues from the last completed stage.

After every stage except the last, the model is saved into the work folder beside OUT
(``.OUT.work/stage-<i>/``) with the same writers the final output uses (``save_pretrained``
plus the compressed-tensors and sparsity config blocks), then read back at once with
``compressor.load`` and compared with the live model: every tensor bit for bit, every module
class, and the plain attributes the stages set on modules (``sparsity_structure`` and the like,
kept in ``attributes.json``). Only a checkpoint that passes is renamed into place (``.partial``
then rename), so a kill while saving never leaves one that looks complete, and a model state
that cannot be rebuilt exactly (a format with no builder in ``compressor.runtime``) is never
resumed from: the run says so in one line and `--resume` re-runs those stages.

``done.json`` holds the run key: recipe sha256, stage index, model reference and a fingerprint
of its weight files, device, batch size and library versions. With ``--resume``, checkpoints
whose key differs from this run's are not reused: the work folder is emptied (a one-line
notice) and the run starts from the first stage. Only the newest checkpoint is kept.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from compressor.errors import UserError
from compressor.guards import check_free_space, state_bytes
from compressor.stages.base import StageContext, StagePlan

CHECKPOINT_VERSION = 1
_PLAIN = (str, int, float, bool, type(None))
_STATE = "run-state"  # a subfolder, so the loader never sees its files as model weights


def run_key(recipe_sha256: str, model_reference: str, model_folder: Path | None, device: torch.device, batch_size: int,
            data: list[str] | None = None) -> dict[str, Any]:
    """What must match for a stage checkpoint to be reused. `data`: fingerprints of the datasets
    the recipe reads (a local file's size and mtime), so an edited calibration file starts over."""
    import transformers

    from compressor import __version__

    files = []
    if model_folder is not None and Path(model_folder).is_dir():
        for path in sorted(Path(model_folder).iterdir()):
            if path.suffix in (".safetensors", ".json") and path.is_file():
                stat = path.stat()
                files.append([path.name, stat.st_size, stat.st_mtime_ns])
    return {
        "recipe_sha256": recipe_sha256,
        "model": model_reference,
        "model_files": files,
        "device": device.type,
        "batch_size": batch_size,
        "data": data or [],
        "versions": {"compressor": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
    }


@dataclass
class LoopState:
    """What the pipeline's stage loop accumulates besides the model."""

    stage_log: list[dict[str, Any]]
    stage_seconds: list[float]
    plans: list[StagePlan]


def save_model_files(model: nn.Module, folder: Path) -> None:
    """The model part of the final output's writer, without packing sparse layers (that would
    change the live model that later stages keep working on)."""
    from compressor.formats import write_quantization_config
    from compressor.sparse_format import write_sparsity_config

    model.save_pretrained(str(folder), safe_serialization=True, max_shard_size="2GB")
    write_quantization_config(model, folder)
    write_sparsity_config(model, folder)


def _message(err: Exception) -> str:
    text = err.format() if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def _difference(live: nn.Module, reloaded: nn.Module) -> tuple[str | None, dict[str, dict[str, Any]]]:
    """Why `reloaded` is not an exact copy of `live` (None if it is), and the plain module
    attributes it lacks (restored from attributes.json)."""
    live_modules, other_modules = dict(live.named_modules()), dict(reloaded.named_modules())
    if live_modules.keys() != other_modules.keys():
        missing = sorted(live_modules.keys() ^ other_modules.keys())
        return f"module tree differs ({', '.join(missing[:3])})", {}
    attributes: dict[str, dict[str, Any]] = {}
    for name, module in live_modules.items():
        other = other_modules[name]
        if type(module) is not type(other):
            return f"{name or 'model'} reloads as {type(other).__name__}, not {type(module).__name__}", {}
        theirs = vars(other)
        for key, value in vars(module).items():
            if key.startswith("_") or key == "training":
                continue
            if isinstance(value, _PLAIN):
                if theirs.get(key, object()) != value or type(theirs.get(key)) is not type(value):
                    attributes.setdefault(name, {})[key] = value
            elif key not in theirs:
                return f"{name or 'model'}.{key} ({type(value).__name__}) is not saved", {}
    # state_dict plus the buffers it leaves out (non-persistent ones, e.g. rotary frequencies)
    live_state = {**dict(live.named_buffers()), **live.state_dict()}
    other_state = {**dict(reloaded.named_buffers()), **reloaded.state_dict()}
    if live_state.keys() != other_state.keys():
        return f"tensors differ ({', '.join(sorted(live_state.keys() ^ other_state.keys())[:3])})", {}
    for key, tensor in live_state.items():
        other = other_state[key]
        if tensor.dtype != other.dtype or tensor.shape != other.shape or not torch.equal(tensor.cpu(), other.cpu()):
            return f"{key} does not reload bit for bit", {}
    return None, attributes


def _unfused_experts(model: nn.Module) -> list[str]:
    """MoE experts modules a stage split into one Linear per expert (compressor.moe_experts)."""
    from compressor.moe_experts import UnfusedExperts

    return [name for name, module in model.named_modules() if isinstance(module, UnfusedExperts)]


def _reload(folder: Path, unfused: list[str]) -> nn.Module:
    """The checkpoint as `compressor.load` builds it, with the experts the live model had split
    (a pruned expert is stored as a dense per-expert `.weight`, which loads fused) split again:
    the split copies the fused tensors' slices, so it is exact."""
    from compressor.moe_experts import fused_experts, unfuse_module
    from compressor.runtime import load

    model = load(folder, prepare_kernels=False)
    fused = fused_experts(model)
    for name in unfused:
        if name in fused:
            unfuse_module(model, name, fused[name])
    return model


def _apply_attributes(model: nn.Module, attributes: dict[str, dict[str, Any]], frozen: list[str], training: bool) -> None:
    modules = dict(model.named_modules())
    for name, values in attributes.items():
        for key, value in values.items():
            setattr(modules[name], key, value)
    frozen_names = set(frozen)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name not in frozen_names)
    model.train(training)


@dataclass
class StageCheckpoints:
    """Writes a checkpoint after each completed stage and restores the newest one on resume."""

    workdir: Path
    key: dict[str, Any]
    stage_kinds: list[str]
    enabled: bool
    resume: bool
    echo: Callable[[str], None]
    _broken: bool = field(default=False, repr=False)

    @property
    def total(self) -> int:
        return len(self.stage_kinds)

    def _folder(self, index: int) -> Path:
        return self.workdir / f"stage-{index + 1}"

    def _completed(self) -> list[tuple[int, Path, dict[str, Any]]]:
        """(stage index, folder, done.json) for every renamed-into-place checkpoint, newest last."""
        found = []
        if not self.workdir.is_dir():
            return found
        for folder in self.workdir.glob("stage-*"):
            suffix = folder.name.removeprefix("stage-")
            done = folder / "done.json"
            if suffix.isdigit() and done.is_file():
                try:
                    record = json.loads(done.read_text())
                except (OSError, ValueError):
                    continue
                found.append((int(record.get("stage_index", -1)), folder, record))
        return sorted(found, key=lambda item: item[0])

    def kept_note(self) -> str | None:
        """What an interrupted or failed run leaves for --resume, in one line (None: nothing)."""
        completed = self._completed()
        if not completed:
            return None
        last = completed[-1][0] + 1
        return f"{self.workdir}: stages 1-{last} are kept there; repeat the command with --resume to continue from stage {last + 1}"

    def drop_empty_workdir(self) -> None:
        """After a failure: a work folder holding no checkpoint (a save refused midway) goes."""
        try:
            self.workdir.rmdir()
        except OSError:  # absent, or holds something worth keeping
            pass

    def restore(self, model: nn.Module, ctx: StageContext, loop: LoopState) -> tuple[nn.Module, int]:
        """With --resume: the model after the newest usable checkpoint and the first stage to run."""
        if not self.resume:
            return model, 0
        completed = self._completed()
        if any(record.get("key") != self.key for _, _, record in completed):
            self.echo(f"resume: the stage checkpoints in {self.workdir} were made by a different recipe, model or calibration data; starting over")
            shutil.rmtree(self.workdir, ignore_errors=True)
            return model, 0
        usable = [item for item in completed if 0 <= item[0] < self.total - 1]
        if not usable:
            self.echo("resume: no completed stage to continue from; running every stage")
            return model, 0
        index, folder, _ = usable[-1]
        extra = folder / _STATE
        state = json.loads((extra / "state.json").read_text())
        try:
            restored = _reload(folder, state.get("unfused_experts", []))
        except Exception as err:  # e.g. a builder that vanished since: never a wrong resume
            self.echo(f"resume: {folder.name} cannot be reloaded ({_message(err)}); running every stage")
            return model, 0
        _apply_attributes(restored, json.loads((extra / "attributes.json").read_text()), state["frozen"], state["training"])
        torch.set_rng_state(load_file(str(extra / "rng.safetensors"))["cpu"])
        ctx.records.update(state["records"])
        ctx.notes.update(state["notes"])
        ctx.artifacts.update({name: self.workdir / relative for name, relative in state["artifacts"].items()})
        loop.stage_log[:] = state["stage_log"]
        loop.stage_seconds[:] = state["stage_seconds"]
        loop.plans[:] = [StagePlan(**plan) for plan in state["plans"]]
        self.echo(f"resume: stages 1-{index + 1} of {self.total} restored from {folder}")
        for skipped in range(index + 1):
            self.echo(f"stage {skipped + 1}/{self.total}: {self.stage_kinds[skipped]} skipped (completed before the interruption)")
        return restored, index + 1

    def save(self, index: int, model: nn.Module, ctx: StageContext, loop: LoopState) -> None:
        """Checkpoint the model after stage `index` when a later stage could resume from it."""
        if not self.enabled or self._broken or index >= self.total - 1:
            return
        folder, partial = self._folder(index), self.workdir / f"stage-{index + 1}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            written = self._write(index, model, ctx, loop, partial)
        except BaseException:  # an interrupt mid-save: leave no half-written stage folder behind
            shutil.rmtree(partial, ignore_errors=True)
            raise
        if not written:
            return
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
        for older, older_folder, _ in self._completed():
            if older < index:
                shutil.rmtree(older_folder, ignore_errors=True)

    def _write(self, index: int, model: nn.Module, ctx: StageContext, loop: LoopState, partial: Path) -> bool:
        """Fill `partial` with the checkpoint after stage `index`; False when it cannot be one."""
        try:
            check_free_space(partial, state_bytes(model))
            save_model_files(model, partial)
            problem, attributes = self._verify(model, partial)
        except UserError as err:
            problem, attributes = err.format(), {}
        if problem is not None:
            shutil.rmtree(partial, ignore_errors=True)
            self._broken = True  # the same modules stay in the model: later stages would fail too
            self.echo(f"checkpoint: no stage checkpoint after stage {index + 1} ({problem}); --resume re-runs it")
            return False
        self._write_state(partial, index, model, ctx, loop, attributes)
        return True

    def _verify(self, model: nn.Module, folder: Path) -> tuple[str | None, dict[str, dict[str, Any]]]:
        try:
            reloaded = _reload(folder, _unfused_experts(model))
        except Exception as err:  # whatever stops it reloading (no builder, a shape the skeleton lacks): no checkpoint
            return f"cannot be reloaded: {_message(err)}", {}
        problem, attributes = _difference(model, reloaded)
        del reloaded
        return problem, attributes

    def _write_state(self, folder: Path, index: int, model: nn.Module, ctx: StageContext, loop: LoopState, attributes: dict) -> None:
        artifacts = {}
        for name, path in ctx.artifacts.items():
            try:
                artifacts[name] = str(Path(path).resolve().relative_to(self.workdir.resolve()))
            except ValueError:
                raise UserError(f"stage artifact {path} lies outside the work folder", where=str(self.workdir)) from None
        state = {
            "records": ctx.records,
            "notes": ctx.notes,
            "artifacts": artifacts,
            "stage_log": loop.stage_log,
            "stage_seconds": loop.stage_seconds,
            "plans": [asdict(plan) for plan in loop.plans],
            "frozen": [name for name, p in model.named_parameters() if not p.requires_grad],
            "training": model.training,
            "unfused_experts": _unfused_experts(model),
        }
        extra = folder / _STATE
        extra.mkdir()
        (extra / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
        (extra / "attributes.json").write_text(json.dumps(attributes, indent=1, sort_keys=True) + "\n")
        save_file({"cpu": torch.get_rng_state()}, str(extra / "rng.safetensors"))
        done = {"version": CHECKPOINT_VERSION, "stage_index": index, "stage": self.stage_kinds[index], "key": self.key}
        (folder / "done.json").write_text(json.dumps(done, indent=1, sort_keys=True) + "\n")
