"""Accuracy against size: one panel per task, every model a point, the Pareto frontier drawn.

A model is on the frontier when no other model is at most as large and at least as good
(better in one of the two). The frontier is drawn as a step line through its points, in order
of size, and named in the legend; every point carries its model's name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window

from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


@dataclass(frozen=True)
class Point:
    label: str
    size_bytes: float
    score: float


def pareto_frontier(points: list[Point], higher_is_better: bool) -> list[Point]:
    """The points no other point dominates, smallest first. A NaN score (a model whose metric
    lm-eval could not compute) compares false with everything, so it would never be dominated:
    it is left out, as from the plot."""

    def better_or_equal(a: float, b: float) -> bool:
        return a >= b if higher_is_better else a <= b

    points = [p for p in points if not math.isnan(p.score)]
    frontier = []
    for p in points:
        dominated = any(
            q is not p
            and q.size_bytes <= p.size_bytes
            and better_or_equal(q.score, p.score)
            and (q.size_bytes < p.size_bytes or q.score != p.score)
            for q in points
        )
        if not dominated:
            frontier.append(p)
    return sorted(frontier, key=lambda p: (p.size_bytes, p.score))


@dataclass(frozen=True)
class Panel:
    title: str  # "perplexity: word_perplexity"
    higher_is_better: bool
    points: list[Point]


def accuracy_vs_size_figure(panels: list[Panel]) -> Figure:
    if not panels:  # no model had both a measured size and a directed metric
        figure, ax = plt.subplots(figsize=(5.2, 2.0))
        ax.axis("off")
        ax.text(0.5, 0.5, "nothing to plot: no model has both a size and a metric", ha="center", va="center")
        return figure
    columns = min(len(panels), 3)
    rows = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, panels):
        sizes = [p.size_bytes / 1e6 for p in panel.points]
        scores = [p.score for p in panel.points]
        ax.scatter(sizes, scores, s=42, zorder=3, label="models", gid="models")
        for point in panel.points:
            ax.annotate(point.label, (point.size_bytes / 1e6, point.score), textcoords="offset points", xytext=(5, 5), fontsize=8)
        frontier = pareto_frontier(panel.points, panel.higher_is_better)
        ax.step(
            [p.size_bytes / 1e6 for p in frontier], [p.score for p in frontier], where="post",
            color="tab:red", linewidth=1.5, zorder=2, label="Pareto frontier", gid="pareto",
            marker="o", markersize=11, markerfacecolor="none",  # rings: a one-model frontier still shows
        )
        direction = "higher is better" if panel.higher_is_better else "lower is better"
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("size on disk (MB)")
        ax.set_ylabel(f"{panel.title.split(': ')[-1]} ({direction})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    figure.tight_layout()
    return figure


def write_accuracy_vs_size(panels: list[Panel], path: Path) -> Figure:
    figure = accuracy_vs_size_figure(panels)
    figure.savefig(path, format="png", dpi=110)
    plt.close(figure)
    return figure
