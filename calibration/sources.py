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
from compressor.data_files import read_jsonl_records, read_utf8
from compressor.errors import DataError, first_line

Document = Union[str, list[dict[str, str]]]

# ShareGPT-style chats (`conversations: [{from: human, value: ...}]`) in chat-template roles.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}

TEXT_COLUMNS = ("text", "content", "abstract", "document", "messages", "conversations")


@dataclass(frozen=True)
class HubDatasetSource:
    """A well-known Hub dataset and how to read text from it."""

    path: str
    subset: str | None
    split: str
    column: str
    data_files: str | None = None  # one file of a huge set: what calibration needs, not terabytes


KNOWN_HUB_SETS = {
    "wikitext": HubDatasetSource("Salesforce/wikitext", "wikitext-2-raw-v1", "train", "text"),
    # The "en" config is 365M documents (~300 GB); one shard holds ~356k, plenty for calibration.
    "c4": HubDatasetSource("allenai/c4", None, "train", "text", data_files="en/c4-train.00000-of-01024.json.gz"),
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
        elif isinstance(value, list) and all(isinstance(m, dict) and "value" in m for m in value):  # ShareGPT
            documents.append([{"role": SHAREGPT_ROLES.get(str(m.get("from")), str(m.get("from", "user"))),
                               "content": str(m["value"])} for m in value])
        elif value is not None:
            raise DataError(f"record {index}: column '{name}' is neither text nor a list of messages", where=source)
    if not documents:
        raise DataError(f"column '{name}' holds no text", where=source)
    return documents


def _read_text(path: Path) -> str:
    return read_utf8(path, str(path))


def _read_jsonl(path: Path, column: str | None) -> list[Document]:
    return _documents_from_records(read_jsonl_records(path, str(path)), column, str(path))


def _read_json(path: Path, column: str | None) -> list[Document]:
    """A JSON list of records, or JSON lines under a .json name (as `datasets` accepts both)."""
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # one object per line
            return _read_jsonl(path, column)
        raise DataError(f"not valid JSON: {err.msg}", where=f"{path}:{err.lineno}") from None
    if not isinstance(data, list) or not all(isinstance(record, dict) for record in data):
        raise DataError("a .json calibration file must be a list of JSON objects (or one object per line)", where=str(path))
    return _documents_from_records(data, column, str(path))


def _read_txt(path: Path, column: str | None) -> list[Document]:
    if column is not None:  # silently reading the whole file would hide a recipe meant for another file
        raise DataError(f"calibration.text_column '{column}' does not apply to a .txt file (read as paragraphs)", where=str(path))
    text = _read_text(path)
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
    ".json": _read_json,
    ".txt": _read_txt,
    ".parquet": _read_parquet,
}


def _datasets_library(label: str):
    try:
        import datasets
    except ImportError:
        raise DataError("Hub datasets need the `datasets` package (pip install 'compressor[data]')", where=label) from None
    return datasets


_UNSUPPORTED = (
    f"unsupported calibration file (use {', '.join(LOCAL_READERS)}, a datasets folder or a Hub dataset id)"
)


def _read_hub(path: str, subset: str | None, split: str, column: str | None, label: str,
              data_files: str | None = None) -> list[Document]:
    datasets = _datasets_library(label)
    try:
        dataset = datasets.load_dataset(path, subset, split=split, data_files=data_files)
    except Exception as err:  # datasets raises many types for missing/offline sets
        if datasets.config.HF_HUB_OFFLINE:
            raise DataError(
                f"'{path}' is not in the local datasets cache and the Hub is offline (HF_HUB_OFFLINE=1): load it once"
                " online to cache it, or save it to a folder (Dataset.save_to_disk) or a .jsonl/.parquet file and"
                " give that path",
                where=label,
            ) from None
        raise DataError(f"cannot load dataset '{path}' (split {split}): {first_line(err)}", where=label) from None
    return _documents_from_records(dataset.to_list(), column, label)


_SAVED_DATASET_FILES = ("state.json", "dataset_dict.json")  # what Dataset(Dict).save_to_disk writes


def _read_folder(path: Path, split: str, column: str | None) -> list[Document]:
    """A local datasets folder: one `save_to_disk` wrote, or data files `load_dataset` reads."""
    datasets = _datasets_library(str(path))
    saved = any((path / name).is_file() for name in _SAVED_DATASET_FILES)
    try:
        dataset = datasets.load_from_disk(str(path)) if saved else datasets.load_dataset(str(path), split=split)
    except Exception as err:  # damaged, from an incompatible datasets version, no data files, no such split
        what = "the saved dataset" if saved else "the folder's data files (.jsonl, .json, .csv, .parquet, .txt)"
        raise DataError(f"cannot load {what}: {first_line(err)}", where=str(path)) from None
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError(f"no split '{split}' (splits: {', '.join(dataset)}); set calibration.split", where=str(path))
        dataset = dataset[split]
    return _documents_from_records(dataset.to_list(), column, str(path))


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
    if path.is_dir():
        return None
    if path.exists() or dataset.startswith((".", "/", "~")):
        return _UNSUPPORTED if path.exists() else "calibration file or folder not found"
    return None


def load_documents(dataset: str, *, text_column: str | None, split: str, subset: str | None) -> list[Document]:
    """The documents named by a recipe's ``calibration.dataset``."""
    if dataset == "builtin:abstracts":
        return list(read_abstracts(calibration_slice_path()))
    if dataset.startswith("builtin:"):
        raise DataError(f"unknown built-in dataset '{dataset}' (known: builtin:abstracts)", where="calibration.dataset")
    if dataset in KNOWN_HUB_SETS:
        known = KNOWN_HUB_SETS[dataset]
        return _read_hub(known.path, known.subset, known.split, text_column or known.column, dataset, known.data_files)
    path = Path(dataset).expanduser()
    if path.suffix in LOCAL_READERS:
        if not path.is_file():
            raise DataError("calibration file not found", where=str(path))
        return LOCAL_READERS[path.suffix](path, text_column)
    if path.is_dir():
        return _read_folder(path, split, text_column)
    if path.exists() or dataset.startswith((".", "/", "~")):
        raise DataError(_UNSUPPORTED if path.exists() else "calibration file or folder not found", where=dataset)
    return _read_hub(dataset, subset, split, text_column, dataset)
