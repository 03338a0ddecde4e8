"""Wanda (Sun et al., 2023) and the OWL layer-wise sparsity schedule (Yin et al., 2024).

Wanda scores each weight by ``|W_ij| · ‖X_j‖₂``: its magnitude times the norm of the input
feature it multiplies over the calibration tokens, and prunes the lowest scores of each
output row (or of each N:M group). No weight update.

OWL gives layers with many outlier scores (score > ``threshold`` × the layer's mean score)
a lower sparsity and layers with few a higher one, keeping the average at the target:
``s_l = s − (D'_l − mean D')`` where ``D'`` are the outlier ratios rescaled to ``[0, 2λ]``.
"""

from __future__ import annotations

import torch

from compressor.algorithms.masks import NMPattern, nm_mask, unstructured_mask


class ColumnNormAccumulator:
    """Running sum of squares of each input feature over every token seen (float32)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.sum_squares = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).float()
        self.sum_squares += x.pow(2).sum(0)
        self.count += x.shape[0]

    def norms(self) -> torch.Tensor:
        return self.sum_squares.sqrt()


def wanda_scores(weight: torch.Tensor, column_norms: torch.Tensor) -> torch.Tensor:
    return weight.float().abs() * column_norms.to(weight.device).unsqueeze(0)


def wanda_prune(
    weight: torch.Tensor, column_norms: torch.Tensor, *, sparsity: float | None = None, pattern: NMPattern | None = None
) -> torch.Tensor:
    """`weight` with the lowest-scoring entries zeroed (per output row, or per N:M group)."""
    scores = wanda_scores(weight, column_norms)
    keep = nm_mask(scores, pattern) if pattern is not None else unstructured_mask(scores, sparsity or 0.0, per_row=True)
    return weight * keep


def outlier_ratio(scores: list[torch.Tensor], threshold: float) -> float:
    """Fraction of scores above `threshold` × the mean score of their own layer."""
    outliers = sum(int((s > threshold * s.mean()).sum()) for s in scores)
    total = sum(s.numel() for s in scores)
    return outliers / max(total, 1)


def owl_sparsities(ratios: list[float], target: float, spread: float) -> list[float]:
    """Per-layer sparsities from outlier ratios, averaging to `target`, within ±`spread`."""
    values = torch.tensor(ratios, dtype=torch.float64)
    span = float(values.max() - values.min())
    if span == 0:
        return [target] * len(ratios)
    scaled = (values - values.min()) / span * (2 * spread)
    sparsities = target - (scaled - scaled.mean())
    return [float(min(max(s, 0.0), 0.99)) for s in sparsities]
