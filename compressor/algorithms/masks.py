"""Which weights to keep: N:M and unstructured mask selection from importance scores.

Every function returns a boolean *keep* mask of the score's shape (True = weight stays).
Scores are "higher is more important".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class NMPattern:
    """`keep` weights of every `group` consecutive input columns are kept ("2:4")."""

    keep: int
    group: int

    def __str__(self) -> str:
        return f"{self.keep}:{self.group}"

    @property
    def sparsity(self) -> float:
        return 1.0 - self.keep / self.group


def parse_nm(text: str) -> NMPattern:
    """`"2:4"` → NMPattern(2, 4); ValueError for anything that is not 0 < N < M."""
    match = _NM.match(text)
    if match is None:
        raise ValueError(f"'{text}' is not an N:M pattern such as \"2:4\" or \"4:8\"")
    keep, group = int(match.group(1)), int(match.group(2))
    if not 0 < keep < group:
        raise ValueError(f"'{text}': N:M sparsity needs 0 < N < M (N weights kept out of every M)")
    return NMPattern(keep, group)


def nm_mask(scores: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Keep the `pattern.keep` highest scores of each group of `pattern.group` along the last dim."""
    rows, columns = scores.shape
    if columns % pattern.group:
        raise ValueError(f"{columns} columns are not divisible by {pattern.group} for {pattern} sparsity")
    grouped = scores.reshape(rows, columns // pattern.group, pattern.group)
    top = torch.topk(grouped, pattern.keep, dim=-1, sorted=False).indices
    keep = torch.zeros_like(grouped, dtype=torch.bool)
    keep.scatter_(-1, top, True)
    return keep.reshape(rows, columns)


def unstructured_mask(scores: torch.Tensor, sparsity: float, *, per_row: bool) -> torch.Tensor:
    """Drop the `sparsity` fraction of lowest scores, per output row or over the whole matrix."""
    flat = scores if per_row else scores.reshape(1, -1)
    prune = int(flat.shape[1] * sparsity)
    keep = torch.ones_like(flat, dtype=torch.bool)
    if prune > 0:
        lowest = torch.topk(flat, prune, dim=1, largest=False, sorted=False).indices
        keep.scatter_(1, lowest, False)
    return keep.reshape(scores.shape)


def measured_sparsity(weight: torch.Tensor) -> float:
    """Fraction of exactly-zero entries."""
    return float((weight == 0).sum()) / max(weight.numel(), 1)


def is_nm_sparse(weight: torch.Tensor, pattern: NMPattern) -> bool:
    """Whether every group of `pattern.group` columns holds at most `pattern.keep` non-zeros."""
    rows, columns = weight.shape
    if columns % pattern.group:
        return False
    nonzero = (weight != 0).reshape(rows, columns // pattern.group, pattern.group).sum(-1)
    return bool((nonzero <= pattern.keep).all())
