"""Evaluate several models on the same tasks and write one report: the shared core of
`compress eval` and a recipe's `evaluate:` block."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from compressor.evaluation.catalog import TaskCatalog, lm_eval_version
from compressor.evaluation.report import ModelRow, build_report, write_report
from compressor.evaluation.results_cache import ResultsCache
from compressor.evaluation.runner import EvalSettings, EvalTarget, PreparedTasks, evaluate_target
from compressor.evaluation.size import SizeInfo


@dataclass
class _Samples:
    records: dict[str, list[dict[str, Any]]]  # lm-eval's per-sample records, per task
    prompt: dict[str, Any]  # how the prompts were built, for lm-eval's results_<date>.json beside them


@dataclass
class Comparison:
    """Rows gathered one model at a time (the recipe evaluates the base before its stages)."""

    settings: EvalSettings
    catalog: TaskCatalog
    cache: ResultsCache | None
    echo: Callable[[str], None] = print
    rows: list[ModelRow] = field(default_factory=list)
    raw: dict[str, dict[str, Any]] = field(default_factory=dict)
    samples: dict[str, _Samples] = field(default_factory=dict)
    prepared: PreparedTasks | None = None  # the tasks built before any model loaded: the first model to score all of them takes them

    def add(self, target: EvalTarget, size: SizeInfo | None) -> ModelRow:
        outcome = evaluate_target(target, self.settings, self.catalog, self.cache, self.echo, self.prepared)
        ceiling = outcome.batch_ceiling
        row = ModelRow(
            name=target.name,
            reference=target.reference,
            backend=self.settings.backend,
            size=size,
            metrics=outcome.metrics,
            tokens_per_second=outcome.tokens_per_second,
            cached_tasks=outcome.cached,
            # lm-eval's sizes found by --batch-size auto, when this run scored anything
            batch_sizes=list(outcome.results.get("config", {}).get("batch_sizes") or []) if len(outcome.cached) < len(self.settings.tasks) else [],
            max_batch_size=ceiling.value if ceiling is not None else None,
            max_batch_size_source=ceiling.source if ceiling is not None else None,
        )
        self.rows.append(row)
        self.raw[target.name] = outcome.results
        if outcome.samples is not None:
            options = self.settings.options
            prompt = {
                "system_instruction": options.system_instruction,
                "chat_template": target.chat_template,
                "fewshot_as_multiturn": options.fewshot_as_multiturn,
            }
            self.samples[target.name] = _Samples(outcome.samples, prompt)
        return row

    def _ceiling_setting(self) -> dict[str, Any]:
        """`max_batch_size` as the models that ran used it (the CPU memory ceiling, say, where the
        user gave none), with its `max_batch_size_source`; "per model" where they differ."""
        used = {(r.max_batch_size, r.max_batch_size_source) for r in self.rows if len(r.cached_tasks) < len(self.settings.tasks)}
        if not used:  # every result from the cache: nothing searched; what was asked for, if anything
            given = self.settings.max_batch_size if self.settings.searches_batch_size else None
            used = {(given, self.settings.max_batch_size_source if given is not None else None)}
        value, source = used.pop() if len(used) == 1 else (None, "per model")
        return {"max_batch_size": value, "max_batch_size_source": source}

    def write(self, folder: Path, base: str) -> dict[str, Any]:
        from compressor.evaluation.samples import write_samples

        settings = {"batch_size": self.settings.batch_size, **self._ceiling_setting(), **self.settings.options.describe()}
        report = build_report(
            self.rows, base, [t.name for t in self.settings.tasks], self.settings.limit, lm_eval_version(), self.settings.num_fewshot,
            settings,
        )
        write_report(folder, report, self.raw)
        for name, logged in self.samples.items():
            write_samples(folder, name, self.raw[name], logged.records, logged.prompt)
        return report
