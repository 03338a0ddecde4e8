"""Load a model to evaluate, find its weights on disk, and name it for the results cache.

``load_for_evaluation`` is the one place an evaluated checkpoint is loaded. A local
compressed-tensors checkpoint is built with the project's runtime (``compressor.load``: packed
weights stay packed and run on the project's kernels, so the evaluation measures the model
users will run), and so is a pruned checkpoint in the sparse-bitmask layout, which plain
transformers cannot read. Everything else, and a compressed format the runtime does not rebuild, goes
through ``compressor.model_io`` (plain ``from_pretrained``: Hub ids, local folders, ``.gguf``
files and ``builtin:`` names).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from compressor.errors import ModelError, UserError, first_line
from compressor.model_io import LoadedModel, load_model, load_tokenizer, local_folder, resolve_model


class ModelLoadError(UserError):
    """A model named on the command line (or the recipe's base) that cannot be loaded."""


def _built_by_runtime(folder: Path) -> bool:
    """A compressed-tensors checkpoint, or one with our sparse-bitmask layers (which plain
    transformers refuses: see compressor.sparse_format)."""
    from compressor.sparse_format import CONFIG_KEY

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (config.get("quantization_config") or {}).get("quant_method") == "compressed-tensors" or CONFIG_KEY in config


def load_for_evaluation(reference: str, *, trust_remote_code: bool = False) -> LoadedModel:
    source = resolve_model(reference)
    folder = local_folder(source)
    if folder is not None and _built_by_runtime(folder):
        from compressor.runtime import load

        try:
            model = load(folder)
        except ModelError:
            # A scheme the runtime does not rebuild (yet): transformers decompresses it to dense.
            return load_model(reference, trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(str(folder), reference, trust_remote_code)
        return LoadedModel(model=model, tokenizer=tokenizer, source=source, folder=folder)
    return load_model(reference, trust_remote_code=trust_remote_code)


def load_named(name: str, reference: str, *, trust_remote_code: bool = False) -> LoadedModel:
    """`load_for_evaluation`, with any failure reported as the named model's (exit code 2)."""
    try:
        return load_for_evaluation(reference, trust_remote_code=trust_remote_code)
    except UserError as err:
        raise ModelLoadError(f"model '{name}' failed to load: {err.message}", where=reference) from None
    except Exception as err:  # a corrupt or unsupported checkpoint: name the model, not a traceback
        raise ModelLoadError(f"model '{name}' failed to load: {type(err).__name__}: {first_line(err)}", where=reference) from None


def tokenizer_for(reference: str, *, trust_remote_code: bool = False):
    """The tokenizer the evaluation will use, read without loading the weights (a `.gguf` is
    converted once and cached, as its evaluation loads it from there)."""
    source = resolve_model(reference)
    folder = local_folder(source)
    return load_tokenizer(str(folder) if folder is not None else source.load_path, reference, trust_remote_code)


def weights_folder(reference: str) -> Path | None:
    """The local folder holding the model's safetensors, if there is one (Hub: the cached snapshot)."""
    source = resolve_model(reference)
    folder = local_folder(source)
    if folder is not None:
        return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source.load_path, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]))
    except Exception:  # not in the local Hub cache: size is unknown, not an error
        return None


def model_identity(reference: str) -> str | None:
    """A key that changes when the weights change: Hub id and commit, or path, size and mtime of each weight file.

    None when the weights cannot be pinned down (then nothing is cached for this model).
    """
    try:
        source = resolve_model(reference)
    except ModelError:
        return None
    if source.kind == "gguf":
        assert source.gguf_file is not None
        files = [source.gguf_file]
    else:
        folder = weights_folder(reference)
        if folder is None:
            return None
        if source.kind == "hub":
            return f"hub:{source.load_path}@{folder.name}"
        files = sorted(folder.glob("*.safetensors")) + [folder / "config.json"]
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return f"{source.kind}:{digest.hexdigest()[:24]}"
