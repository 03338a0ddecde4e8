"""Merge inputs: find each model's checkpoint folder and read its tensors one name at a time.

A reference is a Hub id, a local folder, a .gguf file, or `model+adapter` (a peft LoRA adapter,
merged into its model once and cached). Tensors are read lazily through `safetensors.safe_open`,
shard by shard as `model.safetensors.index.json` maps them; a file is opened for each read and
closed right after, so the pages of the memory map do not stay in the process (they would count
toward its resident memory, and three inputs read in full would hold three models).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from compressor.cache import cache_root
from compressor.errors import ModelError, first_line
from compressor.model_io import HUB_ID, prepare_source, resolve_model
from compressor.weight_files import safetensors_files

HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def split_reference(reference: str) -> tuple[str, str | None]:
    """`model+adapter` → (model, adapter); a plain reference → (reference, None)."""
    model, plus, adapter = reference.partition("+")
    if plus and (not model or not adapter):
        raise ModelError("write a LoRA input as MODEL+ADAPTER", where=reference)
    return model, adapter or None


def _hub_folder(hub_id: str, reference: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(hub_id, allow_patterns=HUB_PATTERNS))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as err:
        raise ModelError(f"cannot fetch from the Hub: {first_line(err)}", where=reference) from None


ADAPTER_PATTERNS = ["*.json", "*.safetensors"]


def adapter_folder(adapter: str, reference: str) -> Path:
    """The local folder of a peft adapter (a folder, or a Hub id fetched or found in the cache),
    resolved at plan time so that a missing adapter fails `--dry-run`, not the merge."""
    path = Path(adapter).expanduser()
    if path.is_dir():
        if not (path / "adapter_config.json").is_file():
            raise ModelError(f"adapter folder {adapter} has no adapter_config.json; not a peft adapter", where=reference)
        return path
    if path.exists() or adapter.startswith((".", "/", "~")) or adapter.count("/") > 1:
        raise ModelError(f"adapter {adapter} not found (give a peft adapter folder or its Hub id)", where=reference)
    if not HUB_ID.match(adapter):
        raise ModelError(f"adapter {adapter} is not a local folder and not a Hub id of the form org/name", where=reference)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(adapter, allow_patterns=ADAPTER_PATTERNS))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as err:
        raise ModelError(f"cannot fetch adapter {adapter} from the Hub: {first_line(err)}", where=reference) from None
    if not (folder / "adapter_config.json").is_file():
        raise ModelError(f"Hub repo {adapter} has no adapter_config.json; not a peft adapter", where=reference)
    return folder


def _refuse_bare_adapter(model: str, reference: str) -> None:
    """A peft adapter folder named as a model: say how to write it, not just "no config.json"."""
    folder = Path(model).expanduser()
    if folder.is_dir() and not (folder / "config.json").is_file() and (folder / "adapter_config.json").is_file():
        raise ModelError("this folder is a peft adapter, not a model: write it as BASE+ADAPTER", where=reference)


def model_folder(reference: str, *, allow_pickle: bool = False) -> Path:
    """The local safetensors folder of a model reference (no adapter part)."""
    source = resolve_model(reference)
    if source.kind == "hub":
        return _hub_folder(source.load_path, reference)
    _, _, folder = prepare_source(reference, allow_pickle=allow_pickle)
    assert folder is not None
    return folder


def _adapter_key(model: Path, adapter: str) -> str:
    parts = [str(model.resolve()), adapter]
    adapter_path = Path(adapter)
    for folder in (model, adapter_path):
        if folder.is_dir():
            parts += [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(folder.iterdir()) if p.is_file()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def merge_adapter(model: Path, adapter: str, reference: str, trust_remote_code: bool = False) -> Path:
    """Fold a peft LoRA adapter into its model once; the merged checkpoint is cached."""
    target = cache_root() / "merge-lora" / _adapter_key(model, adapter)
    if (target / "config.json").is_file():
        return target
    from peft import PeftModel

    from compressor.load_checks import load_causal_lm

    if Path(adapter).exists() and not (Path(adapter) / "adapter_config.json").is_file():
        raise ModelError("adapter folder has no adapter_config.json; not a peft adapter", where=reference)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        base = load_causal_lm(str(model), reference, dtype="auto", trust_remote_code=trust_remote_code)
        try:
            merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot load the adapter: {first_line(err)}", where=reference) from None
        merged.save_pretrained(str(staging))
        for name in os.listdir(model):
            if name.startswith("tokenizer") or name in ("special_tokens_map.json", "chat_template.jinja"):
                shutil.copy2(model / name, staging / name)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path


class CheckpointTensors:
    """The tensors of one safetensors checkpoint folder: names, shapes, dtypes, lazy reads."""

    def __init__(self, folder: Path, reference: str):
        self.folder = folder
        self.reference = reference
        self.tensors: dict[str, TensorInfo] = {}
        for file in self._files():
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    view = handle.get_slice(name)
                    dtype = SAFETENSORS_DTYPES.get(view.get_dtype())
                    if dtype is None:
                        raise ModelError(f"tensor {name} has unsupported dtype {view.get_dtype()}", where=reference)
                    self.tensors[name] = TensorInfo(tuple(view.get_shape()), dtype, file)

    def _files(self) -> list[Path]:
        return safetensors_files(self.folder)

    def names(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        with safe_open(str(info.file), framework="pt") as handle:
            return handle.get_tensor(name)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` of a tensor (its leading dimension), without reading the rest."""
        info = self.tensors[name]
        with safe_open(str(info.file), framework="pt") as handle:
            return handle.get_slice(name)[start:stop]


@dataclass
class MergeInput:
    """One model taking part in the merge, as the recipe names it and where it lives."""

    reference: str
    folder: Path  # checkpoint to read (the LoRA-merged one for `model+adapter`)
    config_folder: Path  # where config.json and the tokenizer live
    hub_id: str | None
    adapter: str | None = None  # as the recipe names it
    adapter_folder: Path | None = None  # where it lives (resolved at plan time)
    tensors: CheckpointTensors | None = None

    def load(self) -> CheckpointTensors:
        if self.tensors is None:
            self.tensors = CheckpointTensors(self.folder, self.reference)
        return self.tensors


def open_input(reference: str, *, allow_pickle: bool = False) -> MergeInput:
    """Resolve a reference without reading weights; `model+adapter` is merged later by `materialize`."""
    model, adapter = split_reference(reference)
    _refuse_bare_adapter(model, reference)
    folder = model_folder(model, allow_pickle=allow_pickle)
    source = resolve_model(model)
    adapter_path = adapter_folder(adapter, reference) if adapter is not None else None
    return MergeInput(reference=reference, folder=folder, config_folder=folder, hub_id=source.hub_id, adapter=adapter,
                      adapter_folder=adapter_path)


def materialize(item: MergeInput, trust_remote_code: bool = False) -> None:
    """Fold the adapter in (if any), so that `item.folder` holds the weights to merge."""
    if item.adapter_folder is not None and item.folder == item.config_folder:
        item.folder = merge_adapter(item.config_folder, str(item.adapter_folder), item.reference, trust_remote_code)
        item.tensors = None
