"""`compress eval --tasks list` (and `list_groups`, `list_subtasks`, `list_tags`): the task names a run
can ask for, as lm-eval's `--tasks list` / `lm-eval ls` lists them, from the same sources `--tasks`
resolves against: the include paths first, then the built-in offline tasks, then lm-eval's own
(read by `compressor.evaluation.lm_eval_index`, about 1 s, where lm-eval's full index takes about 6: `benchmarks/lm_eval_task_index.py`).
Nothing is loaded and no model is needed."""

from __future__ import annotations

from dataclasses import dataclass

from compressor.evaluation.catalog import TaskCatalog, lm_eval_task_index, lm_eval_version

# lm-eval's words for what to list (its `--tasks list_groups` before 0.4.10, `lm-eval ls groups` now)
LIST_WORDS: dict[str, tuple[str, ...]] = {
    "list": ("group", "tag", "task"),
    "list_groups": ("group",),
    "list_subtasks": ("task",),
    "list_tags": ("tag",),
}
_SOURCE_ORDER = {"include": 0, "builtin": 1, "lm-eval": 2}


@dataclass(frozen=True)
class ListedName:
    name: str
    kind: str  # "group" | "task" | "tag"
    source: str  # "include" | "builtin" | "lm-eval"
    where: str  # the defining file: absolute for an include path, lm_eval/tasks/... for lm-eval's


def task_listing(catalog: TaskCatalog, word: str) -> list[ListedName]:
    """The names of the kinds `word` asks for; a name defined twice is listed where `--tasks` takes it from."""
    kinds = LIST_WORDS[word]
    own = catalog.own_names()
    rows = [
        ListedName(name, entry.kind, source, str(entry.path) if source == "include" else f"built-in: {entry.path.name}")
        for name, (source, entry) in own.items()
    ]
    rows += [
        ListedName(name, entry.kind, "lm-eval", f"lm_eval/tasks/{entry.path}")
        for name, entry in lm_eval_task_index().items()
        if name not in own
    ]
    return sorted((r for r in rows if r.kind in kinds), key=lambda r: (_SOURCE_ORDER[r.source], r.name.lower(), r.name))


def render_listing(rows: list[ListedName], word: str) -> str:
    """A markdown table of `rows` and one line counting them by source and kind."""
    lines = ["| name | kind | defined in |", "|---|---|---|"]
    lines += [f"| {r.name} | {r.kind} | {r.where} |" for r in rows]
    counts = []
    for source, label in (("include", "from --include-path"), ("builtin", "built-in"), ("lm-eval", f"from lm-eval {lm_eval_version()}")):
        found = [r for r in rows if r.source == source]
        if found:
            kinds = ", ".join(f"{sum(r.kind == k for r in found):,} {k}s" for k in LIST_WORDS[word] if any(r.kind == k for r in found))
            counts.append(f"{len(found):,} {label} ({kinds})")
    lines += ["", f"{len(rows):,} names: {'; '.join(counts)}" if counts else "no names"]
    return "\n".join(lines)
