"""Calibration text sources, by name: built-in corpus, well-known Hub sets, local files.

Every source gives documents, each either a string or a chat (a list of ``{"role", "content"}``
messages, rendered later with the model's chat template). ``sampled_documents`` gives them in the
order calibration takes them for a seed, lazily, so a run reads only what it packs:

- what ``datasets`` reads (Hub ids, local dataset folders) is streamed (``streaming=True``; a
  ``save_to_disk`` folder through ``to_iterable_dataset``) and shuffled with a seeded buffer of
  ``SHUFFLE_BUFFER`` documents (``IterableDataset.shuffle``): the same documents for the same seed,
  without downloading or holding the whole split;
- local files and the built-in corpus, read whole as before, are shuffled in full with the seed
  (``random.Random(seed)``), so they pick the same documents as earlier versions did.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Union

from compressor.calibration.corpus import calibration_slice_path, read_abstracts
from compressor.data_files import read_jsonl_records, read_utf8
from compressor.errors import DataError, first_line
from compressor.extras import missing_extra

Document = Union[str, list[dict[str, str]]]

# ShareGPT-style chats (`conversations: [{from: human, value: ...}]`) in chat-template roles.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}

TEXT_COLUMNS = ("text", "content", "abstract", "document", "messages", "conversations")

# Documents a streamed source is shuffled over: the first document taken is drawn from the first
# SHUFFLE_BUFFER of the stream (after a seeded shuffle of its files). Part of the cache and resume
# fingerprint of such sources (STREAM_SAMPLING), since it decides which documents a seed picks.
SHUFFLE_BUFFER = 10_000
STREAM_SAMPLING = f"datasets-stream-shuffle(buffer={SHUFFLE_BUFFER})"

# What the `data` extra's modules are needed for, as the one-line refusal names it.
DATASETS_FEATURE = "a Hub dataset or a datasets folder"
PARQUET_FEATURE = "a .parquet file"


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


def _document(value: Any, name: str, index: int, source: str) -> Document | None:
    """One record's document (None: an empty or missing value, skipped)."""
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        return [{"role": str(m.get("role", "user")), "content": str(m["content"])} for m in value]
    if isinstance(value, list) and all(isinstance(m, dict) and "value" in m for m in value):  # ShareGPT
        return [{"role": SHAREGPT_ROLES.get(str(m.get("from")), str(m.get("from", "user"))), "content": str(m["value"])}
                for m in value]
    if value is not None:
        raise DataError(f"record {index}: column '{name}' is neither text nor a list of messages", where=source)
    return None


def _documents_from_records(records: Iterable[dict[str, Any]], column: str | None, source: str) -> Iterator[Document]:
    """The documents of `records`, as they are read; the text column is chosen from the first record."""
    name: str | None = None
    found = False
    for index, record in enumerate(records):
        if name is None:
            name = _pick_column(list(record.keys()), column, source)
        document = _document(record.get(name), name, index, source)
        if document is not None:
            found = True
            yield document
    if name is None:
        raise DataError("dataset is empty", where=source)
    if not found:
        raise DataError(f"column '{name}' holds no text", where=source)


def _read_text(path: Path) -> str:
    return read_utf8(path, str(path))


def _read_jsonl(path: Path, column: str | None) -> list[Document]:
    return list(_documents_from_records(read_jsonl_records(path, str(path)), column, str(path)))


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
    return list(_documents_from_records(data, column, str(path)))


def _read_txt(path: Path, column: str | None) -> list[Document]:
    if column is not None:  # silently reading the whole file would hide a recipe meant for another file
        raise DataError(f"calibration.text_column '{column}' does not apply to a .txt file (read as paragraphs)", where=str(path))
    text = _read_text(path)
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not paragraphs:
        raise DataError("file is empty", where=str(path))
    return list(paragraphs)


def _read_parquet(path: Path, column: str | None) -> list[Document]:
    missing = missing_extra("pyarrow", PARQUET_FEATURE)
    if missing is not None:
        raise DataError(missing, where=str(path))
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pyarrow.ArrowException, OSError) as err:  # not a parquet file, or a damaged one
        raise DataError(f"cannot read the parquet file: {first_line(err)}", where=str(path)) from None
    return list(_documents_from_records(table.to_pylist(), column, str(path)))


LOCAL_READERS: dict[str, Callable[[Path, str | None], list[Document]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".txt": _read_txt,
    ".parquet": _read_parquet,
}


def _datasets_library(label: str):
    missing = missing_extra("datasets", DATASETS_FEATURE)
    if missing is not None:
        raise DataError(missing, where=label)
    import datasets

    return datasets


_UNSUPPORTED = (
    f"unsupported calibration file (use {', '.join(LOCAL_READERS)}, a datasets folder or a Hub dataset id)"
)


def _hub_offline(datasets) -> bool:
    """Whether `datasets` reads the Hub offline. datasets 2.21+ has `config.HF_HUB_OFFLINE` (either
    variable); 2.19/2.20 only `HF_DATASETS_OFFLINE`, while huggingface_hub still refuses the Hub
    under HF_HUB_OFFLINE=1."""
    if hasattr(datasets.config, "HF_HUB_OFFLINE"):
        return bool(datasets.config.HF_HUB_OFFLINE)
    from huggingface_hub import constants

    return bool(datasets.config.HF_DATASETS_OFFLINE or constants.HF_HUB_OFFLINE)


def _stream_hub(path: str, subset: str | None, split: str, label: str, data_files: str | None = None):
    """The split as a `datasets.IterableDataset`: nothing is downloaded until it is iterated."""
    datasets = _datasets_library(label)
    try:
        return datasets.load_dataset(path, subset, split=split, data_files=data_files, streaming=True)
    except Exception as err:  # datasets raises many types for missing/offline sets
        if _hub_offline(datasets):
            # Offline, `datasets` streams a set it has cached before; this one is not in that cache.
            raise DataError(
                f"'{path}' is not in the local datasets cache and the Hub is offline (HF_HUB_OFFLINE=1): load it once"
                " online, or save it to a folder (Dataset.save_to_disk) or a .jsonl/.parquet file and give that path",
                where=label,
            ) from None
        raise DataError(f"cannot load dataset '{path}' (split {split}): {first_line(err)}", where=label) from None


_SAVED_DATASET_FILES = ("state.json", "dataset_dict.json")  # what Dataset(Dict).save_to_disk writes


def _stream_folder(path: Path, split: str):
    """A local datasets folder as an IterableDataset: one `save_to_disk` wrote (memory-mapped, read
    through `to_iterable_dataset`), or data files `load_dataset` streams."""
    datasets = _datasets_library(str(path))
    saved = any((path / name).is_file() for name in _SAVED_DATASET_FILES)
    try:
        dataset = datasets.load_from_disk(str(path)) if saved else datasets.load_dataset(str(path), split=split, streaming=True)
    except Exception as err:  # damaged, from an incompatible datasets version, no data files, no such split
        what = "the saved dataset" if saved else "the folder's data files (.jsonl, .json, .csv, .parquet, .txt)"
        raise DataError(f"cannot load {what}: {first_line(err)}", where=str(path)) from None
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError(f"no split '{split}' (splits: {', '.join(dataset)}); set calibration.split", where=str(path))
        dataset = dataset[split]
    return dataset.to_iterable_dataset() if isinstance(dataset, datasets.Dataset) else dataset


def _records(stream, label: str) -> Iterator[dict[str, Any]]:
    """The stream's records; what `datasets` raises while reading (a damaged file, a dropped
    connection) becomes one DataError naming the source."""
    iterator = iter(stream)
    while True:
        try:
            record = next(iterator)
        except StopIteration:
            return
        except Exception as err:
            raise DataError(f"cannot read the dataset: {first_line(err)}", where=label) from None
        yield record


def is_streamed(dataset: str) -> bool:
    """Whether `dataset` is read through `datasets` streaming: a well-known Hub set, a local folder,
    or anything else that does not look like a path (a Hub id)."""
    if dataset.startswith("builtin:"):
        return False
    if dataset in KNOWN_HUB_SETS:
        return True
    path = Path(dataset).expanduser()
    if path.suffix in LOCAL_READERS:
        return False
    return path.is_dir() or not (path.exists() or dataset.startswith((".", "/", "~")))


def _stream(dataset: str, split: str, subset: str | None, text_column: str | None):
    """(IterableDataset, text column, label) of a source `is_streamed` accepts."""
    if dataset in KNOWN_HUB_SETS:
        known = KNOWN_HUB_SETS[dataset]
        return _stream_hub(known.path, known.subset, known.split, dataset, known.data_files), text_column or known.column, dataset
    path = Path(dataset).expanduser()
    if path.is_dir():
        return _stream_folder(path, split), text_column, str(path)
    return _stream_hub(dataset, subset, split, dataset), text_column, dataset


def _local_documents(dataset: str, text_column: str | None) -> list[Document]:
    """The documents of a local file or the built-in corpus, read whole."""
    if dataset == "builtin:abstracts":
        return list(read_abstracts(calibration_slice_path()))
    if dataset.startswith("builtin:"):
        raise DataError(f"unknown built-in dataset '{dataset}' (known: builtin:abstracts)", where="calibration.dataset")
    path = Path(dataset).expanduser()
    if path.suffix in LOCAL_READERS:
        if not path.is_file():
            raise DataError("calibration file not found", where=str(path))
        return LOCAL_READERS[path.suffix](path, text_column)
    raise DataError(_UNSUPPORTED if path.exists() else "calibration file or folder not found", where=dataset)


def dataset_problem(dataset: str) -> str | None:
    """What is wrong with a dataset reference that can be told without reading it (None: nothing).

    Checked when a recipe is planned, so `--dry-run` and the run itself refuse a missing file,
    an unknown built-in or a reader from an extra that is not installed before any weight is read.
    Whether a Hub id exists is only checked when it is read."""
    if dataset.startswith("builtin:"):
        return None if dataset == "builtin:abstracts" else "unknown built-in dataset (known: builtin:abstracts)"
    path = Path(dataset).expanduser()
    if is_streamed(dataset):
        return missing_extra("datasets", DATASETS_FEATURE)
    if path.suffix in LOCAL_READERS:
        if not path.is_file():
            return "calibration file not found"
        return missing_extra("pyarrow", PARQUET_FEATURE) if path.suffix == ".parquet" else None
    return _UNSUPPORTED if path.exists() else "calibration file or folder not found"


def load_documents(dataset: str, *, text_column: str | None, split: str, subset: str | None) -> list[Document]:
    """Every document named by a recipe's ``calibration.dataset``, in stored order (reads it all)."""
    if not is_streamed(dataset):
        return _local_documents(dataset, text_column)
    stream, column, label = _stream(dataset, split, subset, text_column)
    return list(_documents_from_records(_records(stream, label), column, label))


def sampled_documents(dataset: str, *, text_column: str | None, split: str, subset: str | None, seed: int) -> Iterator[Document]:
    """The documents of ``calibration.dataset`` in the order calibration takes them for `seed`, read
    as they are taken (see the module's docstring for the two shuffles)."""
    if not is_streamed(dataset):
        documents = _local_documents(dataset, text_column)
        order = list(range(len(documents)))
        random.Random(seed).shuffle(order)
        return (documents[index] for index in order)
    stream, column, label = _stream(dataset, split, subset, text_column)
    shuffled = stream.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)
    return _documents_from_records(_records(shuffled, label), column, label)
