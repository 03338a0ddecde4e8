"""Evaluate several models on the same tasks and write one report: the shared core of
`compress eval` and a recipe's `evaluate:` block."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from compressor.evaluation.catalog import TaskCatalog, lm_eval_version
from compressor.evaluation.report import ModelRow, build_report, write_report
from compressor.evaluation.results_cache import ResultsCache
from compressor.evaluation.runner import EvalSettings, EvalTarget, evaluate_target
from compressor.evaluation.size import SizeInfo


@dataclass
class Comparison:
    """Rows gathered one model at a time (the recipe evaluates the base before its stages)."""

    settings: EvalSettings
    catalog: TaskCatalog
    cache: ResultsCache | None
    echo: Callable[[str], None] = print
    rows: list[ModelRow] = field(default_factory=list)
    raw: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, target: EvalTarget, size: SizeInfo | None) -> ModelRow:
        outcome = evaluate_target(target, self.settings, self.catalog, self.cache, self.echo)
        row = ModelRow(
            name=target.name,
            reference=target.reference,
            backend=self.settings.backend,
            size=size,
            metrics=outcome.metrics,
            tokens_per_second=outcome.tokens_per_second,
            cached_tasks=outcome.cached,
        )
        self.rows.append(row)
        self.raw[target.name] = outcome.results
        return row

    def write(self, folder: Path, base: str) -> dict[str, Any]:
        report = build_report(
            self.rows, base, [t.name for t in self.settings.tasks], self.settings.limit, lm_eval_version(), self.settings.num_fewshot
        )
        write_report(folder, report, self.raw)
        return report
