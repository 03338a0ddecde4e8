"""Cached lm-eval results of reference (base) models, one file per (model, task, limit, few-shot
count, lm-eval version, prompt and generation options).

The key also holds the backend and the task's definition fingerprint, so editing an
include-path task or upgrading lm-eval never serves a stale number; and every lm-eval option
that changes the numbers (chat template and the SHA-256 of its text, multi-turn few-shot,
system instruction, generation kwargs, seeds: `LmEvalOptions.results_key`), so a result made
without a chat template is never served to a run with one. Each file also keeps the
header of the run that produced it (lm-eval's `config`, `date`, versions), so a results JSON
served wholly from the cache still says how its numbers were made. Files live under
``<compressor cache>/eval-results/`` and are written atomically.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.cache import cache_root


@dataclass(frozen=True)
class CacheKey:
    model: str
    task: str
    task_fingerprint: str
    limit: int | float | None
    num_fewshot: int | None
    lm_eval_version: str
    backend: str
    options: str  # LmEvalOptions.results_key(): canonical JSON
    chat_template_sha: str | None  # the template's text, which the weights' identity does not cover

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.__dict__, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class CachedResults:
    results: dict[str, Any]  # the task's slice of lm-eval's results JSON
    header: dict[str, Any]  # the rest of that run's JSON: config, date, versions (empty in old files)


class ResultsCache:
    def __init__(self, root: Path | None = None):
        self.root = root if root is not None else cache_root() / "eval-results"

    def _path(self, key: CacheKey) -> Path:
        return self.root / f"{key.task}-{key.digest()}.json"

    def get(self, key: CacheKey) -> CachedResults | None:
        path = self._path(key)
        if not path.is_file():
            return None
        record = json.loads(path.read_text())
        if record.get("key") != key.__dict__:
            return None
        return CachedResults(record["results"], record.get("header") or {})  # files of older versions have no header

    def put(self, key: CacheKey, results: dict[str, Any], header: dict[str, Any]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps({"key": key.__dict__, "results": results, "header": header}, sort_keys=True))
        partial.replace(path)
