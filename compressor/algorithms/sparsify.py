"""Sparsifiers for task vectors (the deltas `model - base`), as TIES, DARE and Breadcrumbs use them.

Each keeps a `density` share of a delta's entries and, with ``rescale``, scales what is kept so
its L1 norm equals the original's (mergekit 0.1.5 rescales DARE this way, not by 1/density).
"""

from __future__ import annotations

from typing import Callable

import torch

RESCALE_EPS = 1e-7


def _rescaled(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    kept = delta * mask
    if not rescale:
        return kept
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return kept
    return kept * (before / after)


def _sort_keys(delta: torch.Tensor) -> torch.Tensor:
    # Sorting bf16/fp16 on the CPU is slow and coarse: sort float32 magnitudes.
    keys = delta.abs().reshape(-1)
    return keys.float() if keys.device.type == "cpu" else keys


def keep_largest(delta: torch.Tensor, density: float, rescale: bool, **_: object) -> torch.Tensor:
    """TIES trimming: keep the `density` share of entries largest in magnitude (at least one)."""
    if density >= 1:
        return delta
    if delta.numel() == 0:
        return torch.zeros_like(delta)
    keep = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[torch.argsort(_sort_keys(delta), descending=True)[:keep]] = 1
    return _rescaled(delta, mask.reshape_as(delta), rescale)


def keep_middle(delta: torch.Tensor, density: float, rescale: bool, gamma: float = 0.01, **_: object) -> torch.Tensor:
    """Breadcrumbs: drop the `gamma` share of largest entries as outliers, then the smallest,
    so that a `density` share is kept (the outlier cut shrinks when both do not fit)."""
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
    # torch.bernoulli has no float16 CPU kernel; bf16 and float32 work as they are.
    work = delta.dtype if delta.device.type != "cpu" or delta.dtype != torch.float16 else torch.float32
    probabilities = torch.full(delta.shape, density, dtype=work, device=delta.device)
    mask = torch.bernoulli(probabilities, generator=generator)
    return _rescaled(delta.to(work), mask, rescale).to(delta.dtype)


Sparsifier = Callable[..., torch.Tensor]

SPARSIFIERS: dict[str, Sparsifier] = {
    "magnitude": keep_largest,
    "magnitude_outliers": keep_middle,
    "random": keep_random,
}
