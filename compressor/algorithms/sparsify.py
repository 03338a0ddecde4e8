"""Sparsifiers for task vectors (the deltas `model - base`), as TIES, DARE and Breadcrumbs use them.

Each keeps a `density` share of a delta's entries and, with ``rescale``, scales what is kept so
its L1 norm equals the original's (mergekit 0.1.5 rescales DARE this way, not by 1/density).

Two orders for equal magnitudes at the cut (bf16 deltas have millions of them):
- ``index`` (default): the lower flat index counts as larger. Computed a row slice at a time
  (`compressor.algorithms.delta_selection`), so big tensors need no whole-tensor sort.
- ``sort``: whatever `torch.argsort` of float32 magnitudes gives, as mergekit does. Bit-identical
  to mergekit on the same machine and torch build (the order among equal keys is the sort
  kernel's, unstable), at the cost of about 20 bytes per entry for the sort.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

from compressor.algorithms.delta_selection import DeltaSelector, RandomMask, largest, middle

RESCALE_EPS = 1e-7
TieBreak = Literal["index", "sort"]


def apply_whole(selector: DeltaSelector, delta: torch.Tensor) -> torch.Tensor:
    """Run a chunked selector on one tensor taken as a single chunk."""
    selector.prepare(lambda: iter([delta]))
    return selector.select(0, delta)


def _rescaled(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    kept = delta * mask
    if not rescale:
        return kept
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return kept
    return kept * (before / after)


def _sort_keys(delta: torch.Tensor) -> torch.Tensor:
    # Sorting bf16/fp16 on the CPU is slow and coarse: sort float32 magnitudes (mergekit does too).
    keys = delta.abs().reshape(-1)
    return keys.float() if keys.device.type == "cpu" else keys


def keep_largest(delta: torch.Tensor, density: float, rescale: bool, **_: object) -> torch.Tensor:
    """TIES trimming: keep the `density` share of entries largest in magnitude (at least one)."""
    return apply_whole(largest(delta.numel(), density, rescale), delta)


def keep_middle(delta: torch.Tensor, density: float, rescale: bool, gamma: float = 0.01, **_: object) -> torch.Tensor:
    """Breadcrumbs: drop the `gamma` share of largest entries as outliers, then the smallest,
    so that a `density` share is kept (the outlier cut shrinks when both do not fit)."""
    return apply_whole(middle(delta.numel(), density, rescale, gamma), delta)


def keep_largest_sorted(delta: torch.Tensor, density: float, rescale: bool, **_: object) -> torch.Tensor:
    """`keep_largest` with equal magnitudes ordered by `torch.argsort`, as mergekit orders them."""
    if density >= 1:
        return delta
    if delta.numel() == 0:
        return torch.zeros_like(delta)
    keep = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[torch.argsort(_sort_keys(delta), descending=True)[:keep]] = 1
    return _rescaled(delta, mask.reshape_as(delta), rescale)


def keep_middle_sorted(delta: torch.Tensor, density: float, rescale: bool, gamma: float = 0.01, **_: object) -> torch.Tensor:
    """`keep_middle` with equal magnitudes ordered by `torch.sort`, as mergekit orders them."""
    if density >= 1:
        return delta
    count = delta.numel()
    keep = int(density * count)
    outliers = int(gamma * count)
    smallest = max(0, count - keep - outliers)
    order = torch.sort(_sort_keys(delta), descending=False).indices
    mask = torch.zeros(count, dtype=delta.dtype, device=delta.device)
    mask[order[smallest : smallest + keep]] = 1
    return _rescaled(delta, mask.reshape_as(delta), rescale)


def keep_random(
    delta: torch.Tensor, density: float, rescale: bool, generator: torch.Generator | None = None, **_: object
) -> torch.Tensor:
    """DARE: keep each entry with probability `density`."""
    if density >= 1:
        return delta
    return apply_whole(RandomMask(density, rescale, generator), delta)


Sparsifier = Callable[..., torch.Tensor]

# Whole-tensor sparsifiers with mergekit's sort order, for `tie_break: sort`.
SORTED_SPARSIFIERS: dict[str, Sparsifier] = {
    "magnitude": keep_largest_sorted,
    "magnitude_outliers": keep_middle_sorted,
}
