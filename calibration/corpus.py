"""The built-in corpus: arXiv abstracts on model compression (CC0), split once, for good.

`shared/corpus/abstracts.jsonl` (337 records) was sorted by the SHA-256 of each title; the
first 240 records ship as ``calibration/data/abstracts_calibration.jsonl`` and serve only
calibration (about 68k SmolLM2 tokens, enough for 128 × 512), the other 97 ship as
``evaluation/data/abstracts_evaluation.jsonl`` and serve only evaluation (about 27k
tokens). No record is in both files; a test checks it.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path


def calibration_slice_path() -> Path:
    return Path(str(files("compressor.calibration").joinpath("data/abstracts_calibration.jsonl")))


def evaluation_slice_path() -> Path:
    return Path(str(files("compressor.evaluation").joinpath("data/abstracts_evaluation.jsonl")))


def read_abstracts(path: Path) -> list[str]:
    """Each record as one document: its title, a blank line, its abstract."""
    documents = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                documents.append(f"{record['title']}\n\n{record['abstract']}")
    return documents
