"""What the layer-by-layer engines pass between decoder blocks: the hidden states and keyword
arguments each block receives, chunk by chunk, and the small helpers that move them."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class BlockInputs:
    hidden: list[torch.Tensor] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)


class BlockStatisticsComplete(Exception):
    """Raised by an algorithm's hook once it holds every input it needs from a chunk, so the
    statistics pass skips the rest of the block (its output is never used)."""


def first_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def move(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(move(v, device) for v in value)
    return value


def move_kwargs(kwargs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: move(v, device) for k, v in kwargs.items()}


def statistics_pass(handles: Iterable, chunks: int, run: Callable[[int], object], after_chunk: Callable[[], None]) -> None:
    """`run(i)` for every chunk with the algorithm's hooks (`handles`) attached, each forward
    possibly cut short by BlockStatisticsComplete, and `after_chunk` after each; then the hooks
    are removed."""
    try:
        for i in range(chunks):
            try:
                run(i)
            except BlockStatisticsComplete:
                pass
            after_chunk()
    finally:
        for handle in handles:
            handle.remove()
