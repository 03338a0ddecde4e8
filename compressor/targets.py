"""Which modules a stage acts on: `targets` and `ignore` lists of class names or regexes.

An entry is matched against a module as follows:
- ``re:<regex>``: the regex must match the whole module name (``re.fullmatch``);
- otherwise it matches when it equals the module's class name (``Linear``), the module's
  full name (``lm_head``), or the end of the full name after a dot (``down_proj``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn


def layer_pattern(name: str) -> str:
    """`model.layers.3.mlp.up_proj` → `model.layers.*.mlp.up_proj`: one line for a layer of every block."""
    return re.sub(r"\.\d+\.", ".*.", name)


def validate_pattern(entry: str) -> str:
    """Raise ValueError for an entry whose regex does not compile."""
    if entry.startswith("re:"):
        try:
            re.compile(entry[3:])
        except re.error as err:
            raise ValueError(f"invalid regex '{entry[3:]}': {err}") from None
    elif not entry:
        raise ValueError("empty target")
    return entry


def matches(entry: str, name: str, module: nn.Module) -> bool:
    if entry.startswith("re:"):
        return re.fullmatch(entry[3:], name) is not None
    return entry == type(module).__name__ or entry == name or name.endswith("." + entry)


def first_match(entries: list[str], name: str, module: nn.Module) -> str | None:
    return next((entry for entry in entries if matches(entry, name, module)), None)


@dataclass
class TargetSelection:
    """The modules a stage will touch, and the ones it passes over with the reason."""

    selected: dict[str, nn.Module] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    unmatched: dict[str, list[str]] = field(default_factory=dict)  # "targets"/"ignore" → entries naming no module

    def notes(self, config: Any = None) -> list[str]:
        """A misspelt entry would quietly leave a layer dense (`targets`) or compress what it meant
        to keep (`ignore`) while the other entries match: say so. Entries of the stage's own defaults
        (lowrank's `QuantLinear` before any quantize stage) are generic, not typos."""
        defaults: set[str] = set()
        for key in self.unmatched:
            field = type(config).model_fields.get(key) if config is not None else None
            if field is not None and field.default_factory is not None:
                defaults.update(field.default_factory())
        return [
            f"`{key}: {entry}` matches no module of this model"
            for key, entries in self.unmatched.items()
            for entry in entries
            if entry not in defaults
        ]


def select_modules(model: nn.Module, targets: list[str], ignore: list[str]) -> TargetSelection:
    """Modules matching `targets` and no `ignore` entry (tied duplicates counted once)."""
    selection = TargetSelection()
    seen: set[int] = set()
    named = [(name, module) for name, module in model.named_modules() if name]
    for key, entries in (("targets", targets), ("ignore", ignore)):
        selection.unmatched[key] = [e for e in entries if not any(matches(e, n, m) for n, m in named)]
    for name, module in named:
        if id(module) in seen or first_match(targets, name, module) is None:
            continue
        seen.add(id(module))
        ignored_by = first_match(ignore, name, module)
        if ignored_by is not None:
            selection.skipped[name] = f"ignored by `ignore: {ignored_by}`"
        else:
            selection.selected[name] = module
    return selection
