"""The names lm-eval's task index holds, each with its kind and top-level folder, without building it.

lm-eval 0.4.13's `TaskIndex.build` loads every `*.yaml` under its task folder with its includes
resolved (about 6 s on 2 cores, `benchmarks/lm_eval_task_index.py`) and files each as lm-eval's `_kind_of` says: a config with `class`
is a Python task (named by `task`), else one with `group` is a group, else one with `task` is a
task, whose `tag` values become tags; a file that fails (a list where a name belongs, no such
key) is skipped, and within one folder the first file to claim a name keeps it.

This reads the same files as text: the top-level `class`, `group`, `task`, `tag` and `include`
keys, quoted or not, inline or block lists, with includes merged as lm-eval merges them (each
included file's keys, then the file's own), and applies the same rules in the same order. On
lm-eval 0.4.13 it gives exactly the index's 14,683 names and their kinds (checked against
`TaskManager().all_groups/all_tags/all_subtasks`; tests/test_eval_task_list.py checks some
folders). It takes about 1 s (same benchmark) and is cached per lm-eval version.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

_TOP_KEYS = re.compile(r"""^["']?(class|group|task|tag|include)["']?:[ \t]*([^\n]*)\n((?:[ \t]*-[^\n]*\n)*)""", re.M)
_IGNORED_DIRS = {"__pycache__", ".ipynb_checkpoints"}

KINDS = ("group", "task", "tag")


INDEX_FORMAT = 2  # in the cache file's name: a cache written in another layout is not read


@dataclass(frozen=True)
class IndexedName:
    kind: str  # "group" | "task" | "tag"
    folder: str  # top-level folder under lm-eval's tasks/ of the file that defines it (a tag: its first task's)
    path: str  # that file, relative to lm-eval's tasks/ (a tag: its first task's file)
    folders: tuple[str, ...] = ()  # every top-level folder it needs: a tag's tasks may sit in several

    def __post_init__(self) -> None:
        if not self.folders:
            object.__setattr__(self, "folders", (self.folder,))


def _clean(value: str) -> str:
    return value.split(" #")[0].strip().strip("\"'")


def _value(inline: str, block: str) -> str | list[str]:
    """A top-level value as text: a name, or the items of an inline or block list."""
    inline = inline.split(" #")[0].strip()
    if inline.startswith("["):
        return [_clean(part) for part in inline.strip("[]").split(",") if _clean(part)]
    if inline:
        return _clean(inline)
    return [_clean(line.strip()[1:]) for line in block.splitlines() if _clean(line.strip()[1:])]


@lru_cache(maxsize=None)
def _own_keys(path: Path) -> dict[str, str | list[str]] | None:
    """The file's own top-level keys of interest (the last of a repeated key, as PyYAML); None if
    unreadable. Cached: thousands of task files include the same few templates."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return {key: _value(inline, block) for key, inline, block in _TOP_KEYS.findall(text + "\n")}


def _merged_keys(path: Path, seen: frozenset[Path] = frozenset()) -> dict[str, str | list[str]] | None:
    """`_own_keys` with its includes merged in lm-eval's order; None where lm-eval's load would fail."""
    own = _own_keys(path)
    if own is None or path in seen:
        return None
    own = dict(own)
    includes = own.pop("include", None)
    if includes is None:
        return own
    merged: dict[str, str | list[str]] = {}
    for include in includes if isinstance(includes, list) else [includes]:
        keys = _merged_keys(Path(os.path.normpath(path.parent / include)), seen | {path})  # normpath: resolve() costs seconds here
        if keys is None:
            return None
        merged.update(keys)
    merged.update(own)
    return merged


def _tags(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def scan_lm_eval_index(root: Path) -> dict[str, IndexedName]:
    """Name → `IndexedName` for every group, task and tag lm-eval's index would hold for `root`."""
    _own_keys.cache_clear()  # files may have changed since the last scan
    index: dict[str, IndexedName] = {}
    files = sorted((p for p in root.glob("**/*.yaml") if not _IGNORED_DIRS & set(p.parts)), key=lambda p: p.as_posix())
    for path in files:
        keys = _merged_keys(path)
        if not keys:
            continue
        relative = path.relative_to(root)
        here = (relative.parts[0], relative.as_posix())
        if "class" in keys or ("group" not in keys and "task" in keys):
            name = keys.get("task")
            if not isinstance(name, str) or name in index:
                continue
            index[name] = IndexedName("task", *here)
            for tag in _tags(keys.get("tag")):
                entry = index.setdefault(tag, IndexedName("tag", *here))
                if entry.kind == "tag" and here[0] not in entry.folders:  # a tag over tasks in several folders
                    index[tag] = IndexedName("tag", entry.folder, entry.path, (*entry.folders, here[0]))
        elif isinstance(keys.get("group"), str):
            index.setdefault(keys["group"], IndexedName("group", *here))
    return index


def cached_lm_eval_index(root: Path, cache_file: Path) -> dict[str, IndexedName]:
    """`scan_lm_eval_index(root)`, read from `cache_file` when there (written atomically when not)."""
    if cache_file.is_file():
        cached = json.loads(cache_file.read_text())
        return {name: IndexedName(kind, folder, path, tuple(folders)) for name, (kind, folder, path, folders) in cached.items()}
    index = scan_lm_eval_index(root)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    partial = cache_file.with_suffix(".partial")
    partial.write_text(json.dumps({n: [e.kind, e.folder, e.path, list(e.folders)] for n, e in index.items()}, sort_keys=True))
    partial.replace(cache_file)
    return index
