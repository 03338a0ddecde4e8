"""The evaluation report: report.json, report.md, report.html (plot embedded), accuracy_vs_size.png,
and lm-eval's own results JSON per model under ``lm_eval_results/``.

Recovery is direction-aware: ``value / base`` for higher-is-better metrics, ``base / value``
for lower-is-better ones (perplexity), so 1.0 means "as good as the base" and below 1.0 means
worse either way. A metric whose direction lm-eval does not state gets no recovery.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.evaluation.plot import Panel, Point, write_accuracy_vs_size
from compressor.evaluation.runner import Metric
from compressor.evaluation.size import SizeInfo

SCHEMA = 1
PLOT_FILE = "accuracy_vs_size.png"


@dataclass
class ModelRow:
    name: str
    reference: str
    backend: str
    size: SizeInfo | None
    metrics: dict[str, dict[str, Metric]]
    tokens_per_second: float | None = None
    cached_tasks: list[str] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)  # what lm-eval's --batch-size auto settled on
    max_batch_size: int | None = None  # where that search started (None: no search in this run)
    max_batch_size_source: str | None = None  # runner.BatchCeiling.source


def recovery(value: float, base: float, higher_is_better: bool | None) -> float | None:
    if higher_is_better is None or not all(math.isfinite(v) for v in (value, base)):
        return None
    if higher_is_better:
        return value / base if base != 0 else None
    return base / value if value != 0 else None


def build_report(
    rows: list[ModelRow], base: str, tasks: list[str], limit: int | float | None, lm_eval_version: str, num_fewshot: int | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`settings`: the lm-eval options of the run (batch size, chat template, seeds, ...: LmEvalOptions.describe)."""
    base_row = next(r for r in rows if r.name == base)
    models = []
    for row in rows:
        metrics: dict[str, dict[str, Any]] = {}
        for task, values in row.metrics.items():
            metrics[task] = {}
            for name, metric in values.items():
                reference = base_row.metrics.get(task, {}).get(name)
                metrics[task][name] = {
                    "value": metric.value,
                    "stderr": metric.stderr,
                    "higher_is_better": metric.higher_is_better,
                    "recovery": recovery(metric.value, reference.value, metric.higher_is_better) if reference else None,
                }
        models.append(
            {
                "name": row.name,
                "reference": row.reference,
                "backend": row.backend,
                "size_bytes": row.size.size_bytes if row.size else None,
                "bits_per_weight": row.size.bits_per_weight if row.size else None,
                "parameters": row.size.parameters if row.size else None,
                "stored_as": row.size.stored_as if row.size else None,
                "tokens_per_second": row.tokens_per_second,
                "cached_tasks": row.cached_tasks,
                "batch_sizes": row.batch_sizes,
                "max_batch_size": row.max_batch_size,
                "max_batch_size_source": row.max_batch_size_source,
                "metrics": metrics,
            }
        )
    return {
        "schema": SCHEMA, "base": base, "tasks": tasks, "lm_eval_version": lm_eval_version, "limit": limit,
        "num_fewshot": num_fewshot, "settings": settings or {}, "models": models,
    }


def primary_metrics(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(task row, metric) for the plot and the summary: each task's first metric with a direction."""
    base = next(m for m in report["models"] if m["name"] == report["base"])
    chosen = []
    for task, values in base["metrics"].items():
        directed = [name for name, v in values.items() if v["higher_is_better"] is not None]
        if directed:
            chosen.append((task, directed[0]))
    return chosen


def plot_panels(report: dict[str, Any]) -> list[Panel]:
    base = next(m for m in report["models"] if m["name"] == report["base"])
    panels = []
    for task, metric in primary_metrics(report):
        points = [
            Point(m["name"], m["size_bytes"], m["metrics"][task][metric]["value"])
            for m in report["models"]
            if m["size_bytes"] is not None and metric in m["metrics"].get(task, {})
        ]
        direction = base["metrics"][task][metric]["higher_is_better"]
        if points:
            panels.append(Panel(f"{task}: {metric}", bool(direction), points))
    return panels


# ---------------------------------------------------------------- text renderings

def _number(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "–"
    if abs(value) >= 1000:
        return f"{value:,.1f}"
    return f"{value:.{digits}g}"


def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "–"
    text = _number(entry["value"])
    if entry["stderr"] is not None:
        text += f" ± {_number(entry['stderr'], 2)}"
    if entry["recovery"] is not None:
        text += f" ({entry['recovery'] * 100:.1f} %)"
    return text


def _size_cells(model: dict[str, Any]) -> list[str]:
    size = model["size_bytes"]
    bits = model["bits_per_weight"]
    params = model["parameters"]
    tps = model["tokens_per_second"]
    return [
        f"{size / 1e6:.1f} MB" if size is not None else "–",
        f"{bits:.2f}" if bits is not None else "–",
        f"{params / 1e6:.1f} M" if params is not None else "–",
        f"{tps:.1f}" if tps is not None else "–",
    ]


def report_tables(report: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(heading, header, rows) for the summary table and one table per task."""
    primary = primary_metrics(report)
    header = ["model", "backend", "size", "bits/weight", "parameters", "tokens/s"] + [f"{t}: {m}" for t, m in primary]
    rows = [
        [m["name"], m["backend"], *_size_cells(m)] + [_cell(m["metrics"].get(t, {}).get(name)) for t, name in primary]
        for m in report["models"]
    ]
    tables = [("Summary", header, rows)]
    base = next(m for m in report["models"] if m["name"] == report["base"])
    for task, values in base["metrics"].items():
        names = list(values)
        task_rows = [[m["name"]] + [_cell(m["metrics"].get(task, {}).get(n)) for n in names] for m in report["models"]]
        tables.append((task, ["model"] + names, task_rows))
    return tables


def _shots(report: dict[str, Any]) -> str:
    shots = report.get("num_fewshot")
    return "" if shots is None else f", {shots}-shot"


_CEILING_SOURCES = {
    "flag": "--max-batch-size",
    "recipe": "the recipe's max_batch_size",
    "cpu_memory_ceiling": "the CPU memory ceiling",
    "lm-eval default": "lm-eval's default",
}


def _ceiling_text(settings: dict[str, Any]) -> str:
    """The largest batch the auto search tried, and whence: ` (searched from 3, the CPU memory ceiling)`."""
    source = settings.get("max_batch_size_source")
    if source == "per model":
        return " (searched from a ceiling per model: models[].max_batch_size in report.json)"
    if settings.get("max_batch_size") is None:
        return ""
    return f" (searched from {settings['max_batch_size']}, {_CEILING_SOURCES.get(source, source)})"


def _settings_text(report: dict[str, Any]) -> str:
    """The lm-eval options a reader needs to reproduce the numbers, in lm-eval's flag words."""
    settings = report.get("settings") or {}
    if not settings:
        return ""
    chat = settings.get("apply_chat_template")
    parts = [f"batch size {settings.get('batch_size')}" + _ceiling_text(settings)]
    if chat:
        template = "the tokenizer's chat template" if chat is True else f"chat template '{chat}'"
        parts.append(template + (", few-shot as multi-turn" if settings.get("fewshot_as_multiturn") else ""))
    else:
        parts.append("no chat template")
    if settings.get("system_instruction"):
        parts.append(f"system instruction {json.dumps(settings['system_instruction'])}")
    if settings.get("gen_kwargs"):
        parts.append("gen_kwargs " + ",".join(f"{k}={json.dumps(v)}" for k, v in settings["gen_kwargs"].items()))
    seeds = settings.get("seed") or {}
    if seeds:
        parts.append("seeds " + ",".join(str(seeds.get(slot)) for slot in ("random", "numpy", "torch", "fewshot")) + " (random,numpy,torch,fewshot)")
    if settings.get("log_samples"):
        parts.append("samples logged under samples/")
    return " Settings: " + "; ".join(parts) + "."


def _legend(report: dict[str, Any]) -> str:
    return (
        f"Base: `{report['base']}`. Cells read value ± stderr (recovery against the base; lower-is-better metrics"
        f" inverted, so below 100 % is worse either way). lm-eval {report['lm_eval_version']},"
        f" limit {report['limit'] if report['limit'] is not None else 'none'} per task{_shots(report)}. tokens/s: forward"
        " passes of the lm-eval run (blank when served from the cache)."
    ) + _settings_text(report) + "".join(
        f" `{m['name']}` is sized as its file, {m['stored_as']}, and scored as transformers' dequantized load of it."
        for m in report["models"]
        if (m.get("stored_as") or "").startswith("gguf")
    )


def render_markdown(report: dict[str, Any]) -> str:
    lines = ["# Evaluation report", "", _legend(report), ""]
    for heading, header, rows in report_tables(report):
        lines += [f"## {heading}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    lines += [f"![accuracy against size]({PLOT_FILE})", ""]
    return "\n".join(lines)


def render_html(report: dict[str, Any], png: bytes) -> str:
    parts = [
        "<!doctype html>",
        '<html><head><meta charset="utf-8"><title>Evaluation report</title>',
        "<style>body{font-family:sans-serif;max-width:72em;margin:2em auto}table{border-collapse:collapse;margin-bottom:1.5em}"
        "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}td:first-child,th:first-child{text-align:left}</style>",
        "</head><body>",
        "<h1>Evaluation report</h1>",
        f"<p>{html.escape(_legend(report).replace('`', ''))}</p>",
    ]
    for heading, header, rows in report_tables(report):
        parts.append(f"<h2>{html.escape(heading)}</h2><table>")
        parts.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    encoded = base64.b64encode(png).decode("ascii")
    parts.append(f'<img alt="accuracy against size" src="data:image/png;base64,{encoded}">')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(folder: Path, report: dict[str, Any], lm_eval_results: dict[str, dict[str, Any]]) -> None:
    """Every report file into `folder` (which the caller stages and renames atomically)."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / "lm_eval_results"
    raw.mkdir(exist_ok=True)
    for name, results in lm_eval_results.items():
        (raw / f"{name}.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (folder / "report.md").write_text(render_markdown(report), encoding="utf-8")
    write_accuracy_vs_size(plot_panels(report), folder / PLOT_FILE)
    (folder / "report.html").write_text(render_html(report, (folder / PLOT_FILE).read_bytes()), encoding="utf-8")
