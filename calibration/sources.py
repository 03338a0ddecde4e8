"""Calibration text sources, by name: built-in corpus, well-known Hub sets, local files.

Every source returns a list of documents, each either a string or a chat (a list of
``{"role", "content"}`` messages, rendered later with the model's chat template).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

from compressor.calibration.corpus import calibration_slice_path, read_abstracts
from compressor.errors import DataError, first_line

Document = Union[str, list[dict[str, str]]]

TEXT_COLUMNS = ("text", "content", "abstract", "document", "messages", "conversations")


@dataclass(frozen=True)
class HubDatasetSource:
    """A well-known Hub dataset and how to read text from it."""

    path: str
    subset: str | None
    split: str
    column: str


KNOWN_HUB_SETS = {
    "wikitext": HubDatasetSource("Salesforce/wikitext", "wikitext-2-raw-v1", "train", "text"),
    "c4": HubDatasetSource("allenai/c4", "en", "train", "text"),
    "ultrachat": HubDatasetSource("HuggingFaceH4/ultrachat_200k", None, "train_sft", "messages"),
}


def _pick_column(columns: list[str], requested: str | None, source: str) -> str:
    if requested is not None:
        if requested not in columns:
            raise DataError(f"no column '{requested}' (columns: {', '.join(columns) or 'none'})", where=source)
        return requested
    for candidate in TEXT_COLUMNS:
        if candidate in columns:
            return candidate
    raise DataError(
        f"no text column found (looked for {', '.join(TEXT_COLUMNS)}; columns: {', '.join(columns) or 'none'});"
        " set calibration.text_column",
        where=source,
    )


def _documents_from_records(records: list[dict[str, Any]], column: str | None, source: str) -> list[Document]:
    if not records:
        raise DataError("dataset is empty", where=source)
    columns = list(records[0].keys())
    name = _pick_column(columns, column, source)
    documents: list[Document] = []
    for index, record in enumerate(records):
        value = record.get(name)
        if isinstance(value, str):
            if value.strip():
                documents.append(value)
        elif isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
            documents.append([{"role": str(m.get("role", "user")), "content": str(m["content"])} for m in value])
        elif value is not None:
            raise DataError(f"record {index}: column '{name}' is neither text nor a list of messages", where=source)
    if not documents:
        raise DataError(f"column '{name}' holds no text", where=source)
    return documents


def _read_jsonl(path: Path, column: str | None) -> list[Document]:
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"not valid JSON: {err.msg}", where=f"{path}:{number}") from None
            if not isinstance(record, dict):
                raise DataError("each line must be a JSON object", where=f"{path}:{number}")
            records.append(record)
    return _documents_from_records(records, column, str(path))


def _read_txt(path: Path, column: str | None) -> list[Document]:
    text = path.read_text(encoding="utf-8")
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not paragraphs:
        raise DataError("file is empty", where=str(path))
    return list(paragraphs)


def _read_parquet(path: Path, column: str | None) -> list[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading .parquet needs pyarrow (pip install 'compressor[data]')", where=str(path)) from None
    import pyarrow

    try:
        table = pq.read_table(path)
    except (pyarrow.ArrowException, OSError) as err:  # not a parquet file, or a damaged one
        raise DataError(f"cannot read the parquet file: {first_line(err)}", where=str(path)) from None
    return _documents_from_records(table.to_pylist(), column, str(path))


LOCAL_READERS: dict[str, Callable[[Path, str | None], list[Document]]] = {
    ".jsonl": _read_jsonl,
    ".txt": _read_txt,
    ".parquet": _read_parquet,
}


def _read_hub(path: str, subset: str | None, split: str, column: str | None, label: str) -> list[Document]:
    try:
        import datasets
    except ImportError:
        raise DataError("Hub datasets need the `datasets` package (pip install 'compressor[data]')", where=label) from None
    try:
        dataset = datasets.load_dataset(path, subset, split=split)
    except Exception as err:  # datasets raises many types for missing/offline sets
        raise DataError(f"cannot load dataset '{path}' (split {split}): {first_line(err)}", where=label) from None
    return _documents_from_records(dataset.to_list(), column, label)


def dataset_problem(dataset: str) -> str | None:
    """What is wrong with a dataset reference that can be told without reading it (None: nothing).

    Checked when a recipe is planned, so `--dry-run` and the run itself refuse a missing file
    or an unknown built-in before any weight is read. Hub ids are only checked when read."""
    if dataset.startswith("builtin:"):
        return None if dataset == "builtin:abstracts" else "unknown built-in dataset (known: builtin:abstracts)"
    if dataset in KNOWN_HUB_SETS:
        return None
    path = Path(dataset).expanduser()
    if path.suffix in LOCAL_READERS:
        return None if path.is_file() else "calibration file not found"
    if path.exists() or dataset.startswith((".", "/", "~")):
        return f"unsupported calibration file (use {', '.join(LOCAL_READERS)}) or a Hub dataset id"
    return None


def load_documents(dataset: str, *, text_column: str | None, split: str, subset: str | None) -> list[Document]:
    """The documents named by a recipe's ``calibration.dataset``."""
    if dataset == "builtin:abstracts":
        return list(read_abstracts(calibration_slice_path()))
    if dataset.startswith("builtin:"):
        raise DataError(f"unknown built-in dataset '{dataset}' (known: builtin:abstracts)", where="calibration.dataset")
    if dataset in KNOWN_HUB_SETS:
        known = KNOWN_HUB_SETS[dataset]
        return _read_hub(known.path, known.subset, known.split, text_column or known.column, dataset)
    path = Path(dataset).expanduser()
    if path.suffix in LOCAL_READERS:
        if not path.is_file():
            raise DataError("calibration file not found", where=str(path))
        return LOCAL_READERS[path.suffix](path, text_column)
    if path.exists() or dataset.startswith((".", "/", "~")):
        raise DataError(
            f"unsupported calibration file (use {', '.join(LOCAL_READERS)}) or a Hub dataset id", where=dataset
        )
    return _read_hub(dataset, subset, split, text_column, dataset)
