"""Token batches for calibration: render, tokenize, pack, sample, cache.

Documents come in the order the recipe's seed gives them (``sources.sampled_documents``: streamed
sources are read only as far as they are taken), rendered (chats through the tokenizer's chat
template), tokenized without special tokens and joined with the EOS token into one stream,
which is cut into ``seq_len`` windows; the first ``samples`` windows are the calibration
set. Packing wastes no token on padding, so every sample is a full window and no attention
mask is needed. The result is cached on disk keyed by the tokenizer, the spec and the source
(files' sizes and times; for streamed sources also how they are sampled).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file, save_file

from compressor.calibration.sources import STREAM_SAMPLING, Document, is_streamed, sampled_documents
from compressor.errors import DataError
from compressor.recipe import CalibrationSpec


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash that changes whenever the tokenizer would split text differently."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([tokenizer.eos_token_id, getattr(tokenizer, "chat_template", None)], default=str)
    return hashlib.sha256((body + extra).encode()).hexdigest()[:16]


def source_fingerprint(dataset: str) -> str:
    """Local files and folders: sizes and modification times, so an edited file is not served stale.
    A streamed source (Hub id, dataset folder) also names how it is sampled, so windows cached (or
    stage checkpoints kept for --resume) under an earlier sampling of it are not reused."""
    path = Path(dataset).expanduser()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    found = dataset
    if files:
        stats = [(str(f.relative_to(path)) if f != path else "", f.stat()) for f in files]
        found = f"{path.resolve()}:" + ";".join(f"{name}:{st.st_size}:{st.st_mtime_ns}" for name, st in stats)
    return f"{found}|{STREAM_SAMPLING}" if is_streamed(dataset) else found


def cache_key(spec: CalibrationSpec, tokenizer) -> str:
    payload = json.dumps(
        {"spec": spec.model_dump(mode="json"), "source": source_fingerprint(spec.dataset), "tok": tokenizer_fingerprint(tokenizer)},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _render(document: Document, tokenizer) -> str:
    if isinstance(document, str):
        return document
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("chat data needs a tokenizer with a chat template", where="calibration.dataset")
    return tokenizer.apply_chat_template(document, tokenize=False)


def pack_documents(documents: Iterable[Document], tokenizer, spec: CalibrationSpec) -> torch.Tensor:
    """[samples, seq_len] int64 windows of the EOS-joined token stream of `documents` (in sampling
    order), which is read only until the windows are full."""
    needed = spec.samples * spec.seq_len
    separator = tokenizer.eos_token_id
    stream: list[int] = []
    for document in documents:
        stream.extend(tokenizer(_render(document, tokenizer), add_special_tokens=False)["input_ids"])
        if separator is not None:
            stream.append(separator)
        if len(stream) >= needed:
            break
    if len(stream) < needed:
        raise DataError(
            f"'{spec.dataset}' gives {len(stream)} tokens but samples × seq_len = {spec.samples} × {spec.seq_len}"
            f" = {needed}; lower samples or seq_len",
            where="calibration.samples",
        )
    return torch.tensor(stream[:needed], dtype=torch.int64).reshape(spec.samples, spec.seq_len)


def build_calibration(spec: CalibrationSpec, tokenizer, cache_dir: Path | None) -> torch.Tensor:
    """The calibration token windows for `spec`, from the disk cache when present."""
    path = cache_dir / f"{cache_key(spec, tokenizer)}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        return load_file(str(path))["input_ids"]
    documents = sampled_documents(spec.dataset, text_column=spec.text_column, split=spec.split, subset=spec.subset, seed=spec.seed)
    tokens = pack_documents(documents, tokenizer, spec)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".partial")
        os.close(handle)
        save_file({"input_ids": tokens}, temporary)
        os.replace(temporary, path)
    return tokens
