"""Name → implementation registries for stages and, inside a stage, methods.

A registry is built once by a builder function and frozen; nothing registers into it at
import time of unrelated modules. Third-party packages add stages through the
``compressor.stages`` entry-point group: the entry point names a callable that receives the
registry being built and calls ``register`` on it.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Generic, Iterator, TypeVar

from pydantic import BaseModel

T = TypeVar("T")

STAGE_ENTRY_POINT_GROUP = "compressor.stages"


class Registry(Generic[T]):
    """A mapping from names to entries that refuses duplicates and can be frozen."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._frozen = False

    def register(self, name: str, entry: T) -> None:
        if self._frozen:
            raise RuntimeError(f"the {self.kind} registry is frozen; register while building it")
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = entry

    def freeze(self) -> "Registry[T]":
        self._frozen = True
        return self

    def get(self, name: str) -> T:
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def names(self) -> list[str]:
        return sorted(self._entries)

    def unknown_message(self, name: str) -> str:
        """The one-line complaint for a name that is not registered."""
        close = difflib.get_close_matches(str(name), self.names(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown {self.kind} '{name}' (known: {', '.join(self.names())}){hint}"


@dataclass(frozen=True)
class StageEntry:
    """A stage kind: the pydantic class of its recipe block and the class that runs it."""

    config_class: type[BaseModel]
    implementation: Any


def _load_entry_point_stages(registry: Registry[StageEntry]) -> None:
    for entry_point in entry_points(group=STAGE_ENTRY_POINT_GROUP):
        entry_point.load()(registry)


@functools.cache
def stage_registry() -> Registry[StageEntry]:
    """Every stage kind this installation knows: the built-in ones plus entry points."""
    from compressor.stages import register_builtin_stages

    registry: Registry[StageEntry] = Registry("stage")
    register_builtin_stages(registry)
    _load_entry_point_stages(registry)
    return registry.freeze()
