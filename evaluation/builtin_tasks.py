"""Built-in offline lm-eval tasks over the evaluation slice of the built-in corpus.

The task definitions are lm-eval YAML files in ``tasks/`` (installed as package data); their
``custom_dataset`` points here, so the documents come from the installed
``data/abstracts_evaluation.jsonl`` whether the project runs from a checkout or a wheel.
The calibration slice is never read.

- ``perplexity``: each record (title, blank line, abstract) scored with
  ``loglikelihood_rolling``; word perplexity, byte perplexity, bits per byte.
- ``abstracts_match``: given an abstract, pick its title among ``choices`` titles. The
  distractors are the other records' titles ranked by a seeded SHA-256 of the pair, and the
  true title's position by a seeded SHA-256 of the title: the same questions on every machine.
"""

from __future__ import annotations

import hashlib
import json
from importlib.resources import files
from pathlib import Path
from typing import Any

BUILTIN_TASKS = ("perplexity", "abstracts_match")


def builtin_task_dir() -> Path:
    """The folder of the built-in task YAML files (an lm-eval include path)."""
    return Path(str(files("compressor.evaluation").joinpath("tasks")))


def evaluation_records() -> list[dict[str, str]]:
    path = Path(str(files("compressor.evaluation").joinpath("data/abstracts_evaluation.jsonl")))
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _digest(*parts: object) -> int:
    return int(hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest(), 16)


def perplexity_rows() -> list[dict[str, str]]:
    return [{"title": r["title"], "text": f"{r['title']}\n\n{r['abstract']}"} for r in evaluation_records()]


def match_rows(seed: int = 0, choices: int = 4) -> list[dict[str, Any]]:
    """One question per record: its abstract, `choices` titles, the index of the right one."""
    records = evaluation_records()
    titles = [r["title"] for r in records]
    if len(set(titles)) != len(titles):
        raise ValueError("the evaluation slice has duplicate titles; the match task needs distinct ones")
    if choices < 2 or choices > len(titles):
        raise ValueError(f"choices must be between 2 and {len(titles)}, got {choices}")
    rows = []
    for record in records:
        title = record["title"]
        others = sorted((t for t in titles if t != title), key=lambda other: _digest(seed, title, other))
        options = others[: choices - 1]
        label = _digest(seed, "position", title) % choices
        options.insert(label, title)
        rows.append({"abstract": record["abstract"], "title": title, "choices": options, "label": label})
    return rows


def _as_dataset(rows: list[dict[str, Any]]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def perplexity_dataset(**_metadata: Any):
    """lm-eval `custom_dataset` for `perplexity` (lm-eval passes task metadata as keywords)."""
    return _as_dataset(perplexity_rows())


def match_dataset(seed: int = 0, choices: int = 4, **_metadata: Any):
    """lm-eval `custom_dataset` for `abstracts_match`; `seed`/`choices` come from dataset_kwargs."""
    return _as_dataset(match_rows(seed=int(seed), choices=int(choices)))
