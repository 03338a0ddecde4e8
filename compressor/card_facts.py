"""Facts a model card states about where a checkpoint came from: base models, how it
relates to them, their license, the weight scheme. Read from what the output folder records,
never from the network."""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

from compressor.hub_ids import repo_id_problem

# The Hub's base_model_relation values, chosen from the stages that ran: the first rule
# whose stage kinds appear wins. A merge names several parents; quantization is what a
# compressed checkpoint usually is (even after a recovery distillation); a distillation
# alone trains the weights; trainable LoRA adapters make an adapter. Pruning or a low-rank
# factorization alone is a compressed copy of the base too, which the Hub files under
# "quantized" (it has no better word).
RELATION_RULES: tuple[tuple[frozenset[tuple[str, str | None]], str], ...] = (
    (frozenset({("merge", None)}), "merge"),
    (frozenset({("quantize", None)}), "quantized"),
    (frozenset({("distill", None)}), "finetune"),
    (frozenset({("lowrank", "lora")}), "adapter"),
)
DEFAULT_RELATION = "quantized"

_HF_CACHE_SNAPSHOT = re.compile(r"models--([^/]+?)--([^/]+?)/snapshots/")


def base_model_relation(stages: list[tuple[str, str]]) -> str:
    """quantized / merge / finetune / adapter, from the (kind, method) of each stage."""
    for keys, relation in RELATION_RULES:
        for kind, method in keys:
            if any(k == kind and (method is None or m == method) for k, m in stages):
                return relation
    return DEFAULT_RELATION


def _hub_id_of(entry: Any) -> str | None:
    if isinstance(entry, dict):
        entry = entry.get("hub_id") or entry.get("model") or entry.get("reference")
    if isinstance(entry, str):
        if repo_id_problem(entry) is None and not Path(entry).exists():
            return entry
        match = _HF_CACHE_SNAPSHOT.search(entry)
        if match:
            return f"{match.group(1)}/{match.group(2)}"
    return None


def _unique(items: list[str | None]) -> list[str]:
    seen: list[str] = []
    for item in items:
        if item and item not in seen:
            seen.append(item)
    return seen


def merge_parents(merge: dict[str, Any]) -> list[dict[str, Any]]:
    """The inputs in a compression.json `merge` record, the base first (as a recipe lists them)."""
    entries = list(merge.get("models") or [])
    return sorted(entries, key=lambda entry: entry.get("model") != merge.get("base"))  # stable


def merge_hub_ids(merge: dict[str, Any]) -> list[str]:
    """A merge's inputs as Hub ids; a local folder has none unless it is a Hub cache snapshot."""
    ids = []
    for entry in merge_parents(merge):
        match = _HF_CACHE_SNAPSHOT.search(str(entry.get("model") or ""))
        ids.append(entry.get("hub_id") or (f"{match.group(1)}/{match.group(2)}" if match else None))
    return _unique(ids)


def base_models(compression: dict[str, Any], recipe: dict[str, Any]) -> list[str]:
    """The Hub ids the checkpoint derives from, as far as the output folder says.

    In order: `source.inputs` (a merge's models, when compression.json lists them), the
    `merge` record's inputs, `source.hub_id`, the `base` and `models` of a merge stage in the
    recipe, and a local source that is a Hub cache snapshot (`.../models--org--name/snapshots/...`).
    """
    source = compression.get("source") or {}
    inputs = _unique([_hub_id_of(entry) for entry in source.get("inputs") or []])
    if inputs:
        return inputs
    if compression.get("merge"):
        # Authoritative even when empty: a merge's source.hub_id names its base alone.
        return merge_hub_ids(compression["merge"])
    if source.get("hub_id"):
        return [source["hub_id"]]
    for stage in recipe.get("stages") or []:
        body = stage.get("merge") if isinstance(stage, dict) else None
        if isinstance(body, dict):
            merged = _unique([_hub_id_of(body.get("base"))] + [_hub_id_of(m) for m in body.get("models") or []])
            if merged:
                return merged
    return _unique([_hub_id_of(source.get("reference"))])


def weight_scheme_tags(config: dict[str, Any]) -> list[str]:
    """`w4a16`, `w8a8`, `fp8`, ...: one tag per distinct scheme of `quantization_config`'s groups
    (a mixed-precision checkpoint is all of them, not whichever group sorts first)."""
    groups = (config.get("quantization_config") or {}).get("config_groups") or {}
    tags: list[str] = []
    for group in groups.values():
        weights = group.get("weights") or {}
        if not weights.get("num_bits"):
            continue
        activations = group.get("input_activations") or {}
        # "w8a8" names int8 × int8 (llm-compressor's W8A8); FP8 checkpoints are tagged fp8 on the Hub.
        tag = "fp8" if weights.get("type") == "float" else f"w{weights['num_bits']}a{activations.get('num_bits', 16)}"
        if tag not in tags:
            tags.append(tag)
    return tags


def _gguf_license(path: Path) -> str | None:
    """`general.license` of a GGUF file, read by walking the metadata only as far as that key.

    gguf's GGUFReader parses every field and tensor record up front (for SmolLM2 that is the
    49k-token vocabulary as numpy views: ~150 MB of Python objects, the peak of a whole run
    when the model card was written last), so the key-value section is scanned here with
    gguf's own type table and nothing else is built.
    """
    import numpy as np
    from gguf import GGUFReader
    from gguf.constants import GGUFValueType

    scalar_sizes = {kind: np.dtype(dtype).itemsize for kind, dtype in GGUFReader.gguf_scalar_to_np.items()}
    with path.open("rb") as handle:

        def number(fmt: str) -> int:
            return struct.unpack("<" + fmt, handle.read(struct.calcsize(fmt)))[0]

        def text() -> bytes:
            return handle.read(number("Q"))

        def skip(kind: GGUFValueType) -> None:
            if kind == GGUFValueType.STRING:
                handle.seek(number("Q"), 1)
            elif kind == GGUFValueType.ARRAY:
                item, count = GGUFValueType(number("I")), number("Q")
                if item in scalar_sizes:
                    handle.seek(scalar_sizes[item] * count, 1)
                else:
                    for _ in range(count):
                        skip(item)
            else:
                handle.seek(scalar_sizes[kind], 1)

        if handle.read(4) != b"GGUF" or number("I") < 2:
            return None  # not GGUF, or version 1 (32-bit counts): no license to report
        number("Q")  # tensor count
        for _ in range(number("Q")):
            key = text()
            kind = GGUFValueType(number("I"))
            if key == b"general.license" and kind == GGUFValueType.STRING:
                return text().decode("utf-8", errors="replace")
            skip(kind)
    return None


def _card_license(readme: Path | None) -> str | None:
    if readme is None or not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(readme).data.license
    except Exception:  # a README without a valid YAML header states no license
        return None


def _cached_readme(hub_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(hub_id, "README.md")
    return Path(found) if isinstance(found, str) else None


def source_license(source: dict[str, Any], bases: list[str]) -> str | None:
    """The license of the source model where the folder or cache says it, else None.

    A GGUF file states it in `general.license`; a local checkpoint or a Hub model in the
    local cache in its README's YAML header. A merge inherits a license only when all of
    its inputs share it.
    """
    kind, reference = source.get("kind"), source.get("reference")
    try:
        if kind == "gguf" and reference:
            from compressor.model_io import resolve_model

            gguf_file = resolve_model(reference).gguf_file
            if gguf_file is not None:
                return _gguf_license(gguf_file)
        if kind == "local" and reference and Path(reference).is_dir():
            found = _card_license(Path(reference) / "README.md")
            if found:
                return found
    except Exception:  # the source moved or is unreadable: the card then states no license
        return None
    licenses = {_card_license(_cached_readme(hub_id)) for hub_id in bases}
    return licenses.pop() if len(licenses) == 1 else None


def hub_id_of_reference(reference: str | None) -> str | None:
    """The Hub id a model reference stands for: a Hub id itself, a built-in's, or a Hub cache
    snapshot's; None for a local folder or file (and for a built-in whose wheel is missing)."""
    if not reference:
        return None
    if reference.startswith("builtin:"):
        from compressor.errors import UserError
        from compressor.model_io import resolve_model

        try:
            return resolve_model(reference).hub_id
        except UserError:
            return None
    return _hub_id_of(reference)


def reference_license(reference: str | None, bases: list[str]) -> str | None:
    """The license of the model `reference` names, where it is known offline (see source_license)."""
    if not reference:
        return source_license({}, bases)
    if reference.startswith("builtin:") or reference.endswith(".gguf"):
        kind = "gguf"
    else:
        kind = "local" if Path(reference).is_dir() else "hub"
    return source_license({"kind": kind, "reference": reference}, bases)
