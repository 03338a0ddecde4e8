"""Which evaluation tasks exist, where each is defined, and the lm-eval TaskManager to run them.

Three sources, checked in this order: the built-in offline tasks (``tasks/`` beside this
file), the user's include paths (their YAML is parsed strictly here, so a malformed file is
reported with its line instead of being skipped silently as lm-eval's index does), and
lm-eval's own tasks.

lm-eval's full index parses its ~14,000 task files (about 6 s on 2 cores), so names are
checked against a text scan of those files instead (about 1 s, `benchmarks/lm_eval_task_index.py`; then cached per lm-eval version:
`compressor.evaluation.lm_eval_index`), which gives exactly the index's names and kinds. At run
time the TaskManager indexes only the top-level lm-eval folders that define the requested names
(``include_defaults=False``), and falls back to the full index when a requested group names a
task outside those folders.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

from compressor.cache import cache_root
from compressor.errors import UserError
from compressor.extras import missing_extra
from compressor.evaluation.builtin_tasks import builtin_task_dir
from compressor.evaluation.lm_eval_index import INDEX_FORMAT, IndexedName, cached_lm_eval_index


class TaskError(UserError):
    """An evaluation task that does not exist or whose definition is malformed."""


def lm_eval_version() -> str:
    return version("lm_eval")


def _lm_eval_task_root() -> Path:
    missing = missing_extra("lm_eval", "evaluation")
    if missing is not None:
        raise TaskError(missing)
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise TaskError("lm-eval is installed without its task folder")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def lm_eval_task_index() -> dict[str, IndexedName]:
    """Every name in the installed lm-eval's task index, with its kind and folder
    (`compressor.evaluation.lm_eval_index`), cached per lm-eval version."""
    task_root = _lm_eval_task_root()  # first: it says how to install lm-eval when it is missing
    return cached_lm_eval_index(task_root, cache_root() / "lm_eval" / f"task-index-v{INDEX_FORMAT}-{lm_eval_version()}.json")


def lm_eval_task_names() -> dict[str, tuple[str, ...]]:
    """Name → the top-level lm-eval task folders it needs, for every task, group and tag lm-eval can load."""
    return {name: entry.folders for name, entry in lm_eval_task_index().items()}


class _FunctionTagLoader(yaml.SafeLoader):
    """Safe YAML plus lm-eval's `!function` tag, read as a plain string."""


_FunctionTagLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _line_of_key(node: yaml.Node, key: str) -> int:
    if isinstance(node, yaml.MappingNode):
        for key_node, _ in node.value:
            if getattr(key_node, "value", None) == key:
                return key_node.start_mark.line + 1
    return node.start_mark.line + 1


def read_task_yaml(path: Path) -> dict[str, Any] | None:
    """A task file's mapping; malformed YAML or a bad `task`/`group`/`include` is a TaskError at file:line."""
    try:
        text = path.read_text(encoding="utf-8")
        node = yaml.compose(text, Loader=_FunctionTagLoader)
        data = yaml.load(text, Loader=_FunctionTagLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise TaskError(f"malformed task YAML: {(err.problem or err.context or 'invalid').strip()}", where=f"{path}:{line}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise TaskError(f"cannot read task YAML: {err}", where=str(path)) from None
    if data is None:
        return None
    if not isinstance(data, dict):
        raise TaskError("a task YAML must be a mapping (with `task:` or `group:`)", where=f"{path}:1")
    if "group" not in data and "task" in data and not isinstance(data["task"], str):  # a group lists tasks; a task is one name
        raise TaskError("`task` must be a name (a string)", where=f"{path}:{_line_of_key(node, 'task')}", key="task")
    includes = data.get("include")
    for include in includes if isinstance(includes, list) else ([includes] if includes else []):
        target = Path(include) if Path(str(include)).is_absolute() else path.parent / str(include)
        if not target.is_file():
            raise TaskError(f"included file '{include}' not found", where=f"{path}:{_line_of_key(node, 'include')}", key="include")
    return data


@dataclass(frozen=True)
class DefinedName:
    path: Path  # the YAML file that defines it (a tag: the first file that names it)
    kind: str  # "task" | "group" | "tag"


def scan_include_entries(folder: Path) -> dict[str, DefinedName]:
    """Every task, group and tag in a user include path, with its file and kind, checked strictly."""
    if not folder.is_dir():
        raise TaskError("include path is not a folder", where=str(folder))
    found: dict[str, DefinedName] = {}
    for path in sorted(folder.rglob("*.yaml")):
        if "__pycache__" in path.parts:
            continue
        data = read_task_yaml(path)
        if not data:
            continue
        for key in ("task", "group"):
            if isinstance(data.get(key), str):
                found.setdefault(data[key], DefinedName(path, key))
                break
        tags = data.get("tag")
        for tag in tags if isinstance(tags, list) else ([tags] if isinstance(tags, str) else []):
            found.setdefault(tag, DefinedName(path, "tag"))
    return found


def close_names(name: str, candidates: list[str], count: int = 5) -> list[str]:
    return difflib.get_close_matches(name, candidates, n=count, cutoff=0.6)


@dataclass(frozen=True)
class ResolvedTask:
    name: str
    source: str  # "builtin" | "include" | "lm-eval"
    definition: Path | None  # the YAML file, for built-in and include-path tasks
    lm_eval_folders: tuple[str, ...] = ()  # the top-level lm-eval task folders it needs, for lm-eval tasks (a tag: several)

    def fingerprint(self) -> str:
        """Changes when the task's definition changes (lm-eval's own tasks: its version)."""
        if self.definition is None:
            return f"lm-eval {lm_eval_version()}"
        digest = hashlib.sha256(self.definition.read_bytes())
        if self.source == "builtin":
            from compressor.evaluation import builtin_tasks

            digest.update(Path(builtin_tasks.__file__).read_bytes())
            digest.update(json.dumps(builtin_tasks.evaluation_records()).encode())
        return digest.hexdigest()


@dataclass
class TaskCatalog:
    """The tasks a run may ask for: built-in, user include paths, lm-eval's own."""

    include_paths: tuple[Path, ...] = ()
    _entries: dict[str, tuple[str, DefinedName]] = field(init=False)  # name → (source, definition), as resolve() picks

    def __post_init__(self) -> None:
        self.include_paths = tuple(Path(p).expanduser().resolve() for p in self.include_paths)
        self._entries = {}
        for folder in self.include_paths:  # include paths take precedence, as in lm-eval
            for name, entry in scan_include_entries(folder).items():
                self._entries.setdefault(name, ("include", entry))
        for name, entry in scan_include_entries(builtin_task_dir()).items():
            self._entries.setdefault(name, ("builtin", entry))

    def own_names(self) -> dict[str, tuple[str, DefinedName]]:
        """The include-path and built-in names (source "include" or "builtin"), as `resolve` picks them."""
        return dict(self._entries)

    def resolve(self, names: list[str], where: str = "--tasks") -> list[ResolvedTask]:
        resolved = []
        lm_eval_names: dict[str, tuple[str, ...]] | None = None
        for name in names:
            own = self._entries.get(name)  # include paths, then the built-in tasks, then lm-eval's
            if own is not None:
                source, entry = own
                resolved.append(ResolvedTask(name, source, entry.path))
            else:
                lm_eval_names = lm_eval_names if lm_eval_names is not None else lm_eval_task_names()
                if name not in lm_eval_names:
                    candidates = sorted({*self._entries, *lm_eval_names})
                    close = close_names(name, candidates)
                    hint = f"; did you mean {', '.join(close)}?" if close else ""
                    raise TaskError(f"unknown task '{name}'{hint}", where=where)
                resolved.append(ResolvedTask(name, "lm-eval", None, lm_eval_names[name]))
        return resolved

    def task_manager(self, tasks: list[ResolvedTask]):
        """lm-eval's TaskManager over just the folders these tasks need."""
        from lm_eval.tasks import TaskManager

        roots = [builtin_task_dir(), *self.include_paths]
        folders = sorted({folder for t in tasks for folder in t.lm_eval_folders})
        if not folders:
            return TaskManager(include_path=[str(p) for p in roots], include_defaults=False)
        task_root = _lm_eval_task_root()
        if any(len(t.lm_eval_folders) > 1 for t in tasks):
            # A tag over tasks in several folders: lm-eval gathers a tag's tasks within one indexed
            # folder, and a later one replaces the tag, so separate folders would leave tasks out.
            return TaskManager(include_path=[str(task_root)] + [str(p) for p in roots], include_defaults=False)  # the full index
        manager = TaskManager(include_path=[str(task_root / f) for f in folders] + [str(p) for p in roots], include_defaults=False)
        if all(_members_indexed(manager.task_index, t.name) for t in tasks):
            return manager
        return TaskManager(include_path=[str(task_root)] + [str(p) for p in roots], include_defaults=False)  # the full index


def _members_indexed(index: dict[str, Any], name: str) -> bool:
    """Whether `name` and every member a group of it names are in `index`."""
    entry = index.get(name)
    if entry is None:
        return False
    members = (entry.cfg or {}).get("task") if entry.cfg and "group" in entry.cfg else None
    if not isinstance(members, list):
        return True
    return all(_members_indexed(index, m) for m in members if isinstance(m, str))
