"""Safe YAML loading that remembers the line of every key and list item.

The recipe validator reports errors as ``file:line key.path``; this module gives it the
line for any path in the parsed document.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from compressor.errors import RecipeError

Path_ = tuple[str | int, ...]

# PyYAML follows YAML 1.1, where `1e-5` is a string; recipes write learning rates that way.
_FLOAT_RE = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)$")


class _LineLoader(yaml.SafeLoader):
    pass


_LineLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


class LocatedDocument:
    """A parsed YAML document plus the 1-based line of each key path."""

    def __init__(self, data: Any, lines: dict[Path_, int], source: str):
        self.data = data
        self.lines = lines
        self.source = source

    def line_of(self, path: Path_) -> int | None:
        """The line of `path`, or of its nearest ancestor that has one."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return line
        return None

    def where(self, path: Path_) -> str:
        line = self.line_of(path)
        return f"{self.source}:{line}" if line is not None else self.source

    def locate(self, path: Path_) -> dict[str, str]:
        """``{"where": "file:line", "key": "a.b[0]"}``: the keyword arguments of a RecipeError."""
        return {"where": self.where(path), "key": _format_path(path)}


# Plain data only: a recipe is never allowed to name a Python object or anything exotic.
_ALLOWED_TAGS = {
    f"tag:yaml.org,2002:{kind}" for kind in ("str", "int", "float", "bool", "null", "map", "seq")
}


def _construct(loader: _LineLoader, node: yaml.Node, path: Path_, lines: dict[Path_, int]) -> Any:
    lines.setdefault(path, node.start_mark.line + 1)
    if node.tag == "tag:yaml.org,2002:timestamp":
        return node.value  # a date stays the text it was written as
    if node.tag not in _ALLOWED_TAGS:
        raise RecipeError(
            f"YAML tag '{node.tag}' is not allowed (recipes are plain YAML: values, lists and mappings)",
            key=_format_path(path) or None,
            where=str(node.start_mark.line + 1),
        )
    if isinstance(node, yaml.MappingNode):
        # `<<: *anchor` merge keys: PyYAML puts the merged pairs first, so the mapping's own
        # keys override them; only a key written twice in the mapping itself is a duplicate.
        merged = getattr(node, "merged_pairs", None)
        if merged is None:  # an alias meets the same node again, already flattened
            own = sum(1 for key_node, _ in node.value if key_node.tag != "tag:yaml.org,2002:merge")
            loader.flatten_mapping(node)
            merged = node.merged_pairs = len(node.value) - own
        result: dict[Any, Any] = {}
        from_merge: set[Any] = set()
        for position, (key_node, value_node) in enumerate(node.value):
            key = loader.construct_object(key_node, deep=True)
            if isinstance(key, (list, dict)):
                raise RecipeError("mapping key must be a scalar", where=f"{lines.get(path)}")
            if position < merged:
                from_merge.add(key)
            elif key in from_merge:
                from_merge.discard(key)  # overrides the merged value
            elif key in result:
                raise RecipeError(
                    f"duplicate key '{key}'",
                    key=_format_path((*path, key)),
                    where=str(key_node.start_mark.line + 1),
                )
            child = (*path, key)
            lines[child] = key_node.start_mark.line + 1
            result[key] = _construct(loader, value_node, child, lines)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_construct(loader, item, (*path, i), lines) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def _format_path(path: Path_) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


format_path = _format_path


def load_yaml_with_lines(text: str, source: str) -> LocatedDocument:
    """Parse `text` (safe YAML only) and record where each key sits."""
    loader = _LineLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return LocatedDocument(None, {}, source)
        lines: dict[Path_, int] = {}
        data = _construct(loader, node, (), lines)
    except RecipeError as err:
        err.where = f"{source}:{err.where}" if err.where else source
        raise RecipeError(err.message, where=err.where, key=err.key) from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark is not None else "?"
        problem = (err.problem or err.context or "invalid YAML").strip()
        raise RecipeError(f"not valid YAML: {problem}", where=f"{source}:{line}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"not valid YAML: {err}", where=source) from None
    finally:
        loader.dispose()
    return LocatedDocument(data, lines, source)


def read_yaml_file(path: Path) -> LocatedDocument:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError("recipe file not found", where=str(path)) from None
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"cannot read recipe: {err}", where=str(path)) from None
    return load_yaml_with_lines(text, str(path))
