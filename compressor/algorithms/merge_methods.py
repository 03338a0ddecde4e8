"""The merge methods: how one output tensor is computed from the same tensor of every input.

One function per method, on a list of tensors (all of one shape and dtype) with the parameters
resolved for that tensor. Semantics follow mergekit 0.1.5:

- ``linear``: weighted average in float32 (float64 for float64 inputs); `normalize` (default on)
  divides by the sum of the weights. The base takes part only when it is listed in `models`.
- task-vector family (``task_arithmetic``, ``ties``, ``dare_ties``, ``dare_linear``,
  ``breadcrumbs``): deltas `model - base`, each sparsified (magnitude top-k, random with L1
  rescale, or magnitude with outliers cut), multiplied by its weight, optionally masked by the
  sign consensus (TIES "sum": the sign of the summed weighted deltas; ties go to +), summed,
  optionally divided by the sum of the weights that agree (or all weights), times `lambda`,
  added to the base. Computed in the input dtype, as mergekit does unless `dtype` is set,
  a row slice at a time (sparsifiers sweep the delta first: `delta_selection`).
- ``slerp``: spherical interpolation between the base (t=0) and the other model (t=1) on the
  whole flattened tensor, in float32; nearly colinear tensors (|cos| > 0.9995) fall back to lerp.
- ``model_stock``: average of the fine-tunes pulled toward the base by t = N·cosθ / (1 + (N-1)·cosθ),
  cosθ the mean pairwise cosine between the deltas (whole tensor, or per row with `filter_wise`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from compressor.algorithms.delta_selection import (
    CHUNK_ELEMENTS,
    Chunks,
    DeltaSelector,
    Identity,
    RandomMask,
    largest,
    middle,
    row_slices,
)
from compressor.algorithms.sparsify import SORTED_SPARSIFIERS, Sparsifier, TieBreak
from compressor.registry import Registry

SLERP_DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8
NORMALIZE_EPS = 1e-8


@dataclass(frozen=True)
class TensorMerge:
    """Everything one method call needs: inputs in order and the parameters for this tensor."""

    tensors: tuple[torch.Tensor, ...]
    base_index: int | None
    weight: tuple[float | None, ...]  # per input; None where the method does not use one (the base)
    density: tuple[float, ...]
    gamma: tuple[float, ...]
    normalize: bool
    rescale: bool
    lambda_: float = 1.0
    t: float = 0.5
    filter_wise: bool = False
    generator: torch.Generator | None = None
    tie_break: TieBreak = "index"  # order of equal magnitudes at a TIES / Breadcrumbs cut

    @property
    def base(self) -> torch.Tensor:
        assert self.base_index is not None
        return self.tensors[self.base_index]

    def others(self) -> list[int]:
        return [i for i in range(len(self.tensors)) if i != self.base_index]


BaseUse = Literal["required", "ignored"]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    function: Callable[[TensorMerge], torch.Tensor]
    base: BaseUse
    min_inputs: int  # counting the base
    max_inputs: int | None
    default_normalize: bool
    default_rescale: bool
    uses_weight: bool = True
    uses_density: bool = False
    uses_gamma: bool = False
    uses_t: bool = False
    randomized: bool = False
    elementwise: bool = False  # each output entry depends on the same entry of the inputs only
    options: tuple[str, ...] = ()  # the merge block's other keys that change this method's result

    def parameters(self) -> tuple[str, ...]:
        """Every parameter key this method reads (a recipe setting any other is refused)."""
        used = (("weight", self.uses_weight), ("density", self.uses_density), ("gamma", self.uses_gamma), ("t", self.uses_t))
        return tuple(name for name, uses in used if uses) + self.options


def _float_work_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def linear(m: TensorMerge) -> torch.Tensor:
    first = m.tensors[0]
    work = _float_work_dtype(first)
    weights = [float(w) for w in m.weight]  # type: ignore[arg-type]
    result = torch.zeros_like(first, dtype=work)
    for tensor, weight in zip(m.tensors, weights):
        result.add_(tensor.to(work), alpha=weight)
    if m.normalize:
        result.div_(torch.tensor(weights, dtype=work).sum())
    return result.to(first.dtype)


def _consensus_mask(deltas: torch.Tensor) -> torch.Tensor:
    """TIES sign election ("sum"): keep entries whose sign matches the sign of the summed deltas."""
    majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    return deltas.sign() == majority


@dataclass(frozen=True)
class SortedWhole:
    """A whole-tensor, sort-based sparsifier (`tie_break: sort`) behind the selector interface."""

    sparsify: Sparsifier
    density: float
    rescale: bool
    gamma: float

    def prepare(self, chunks: Chunks) -> None:
        return None

    def select(self, index: int, delta: torch.Tensor) -> torch.Tensor:
        return self.sparsify(delta, self.density, self.rescale, gamma=self.gamma)


SELECTORS: dict[str, Callable[[TensorMerge, int, int], DeltaSelector]] = {
    "magnitude": lambda m, i, numel: largest(numel, m.density[i], m.rescale),
    "magnitude_outliers": lambda m, i, numel: middle(numel, m.density[i], m.rescale, m.gamma[i]),
    "random": lambda m, i, numel: Identity() if m.density[i] >= 1 else RandomMask(m.density[i], m.rescale, m.generator),
}


def _task_vectors(sparsifier: str | None, consensus: bool) -> Callable[[TensorMerge], torch.Tensor]:
    def merge(m: TensorMerge) -> torch.Tensor:
        base = m.base
        others = m.others()
        if not others:
            return base
        sort_based = SORTED_SPARSIFIERS.get(sparsifier) if m.tie_break == "sort" and sparsifier else None
        # Row slices bound the intermediates; the sort-based order needs the whole tensor at once.
        slices = row_slices(base.shape, None if sort_based else CHUNK_ELEMENTS)

        def sweep(index: int) -> Chunks:
            return lambda: (m.tensors[index][rows] - base[rows] for rows in slices)

        selectors: list[DeltaSelector] = []
        for index in others:
            if sort_based is not None:
                selector = SortedWhole(sort_based, m.density[index], m.rescale, m.gamma[index])
            elif sparsifier is None:
                selector = Identity()
            else:
                selector = SELECTORS[sparsifier](m, index, base.numel())
            selector.prepare(sweep(index))
            selectors.append(selector)
        weights = torch.tensor([m.weight[i] for i in others], dtype=base.dtype, device=base.device)
        weights = weights.reshape(-1, *([1] * base.dim()))
        out = torch.empty_like(base)
        for chunk, rows in enumerate(slices):
            start = base[rows]
            deltas = start.new_empty((len(others), *start.shape))
            for row, (index, selector) in enumerate(zip(others, selectors)):
                deltas[row] = selector.select(chunk, m.tensors[index][rows] - start)
            deltas.mul_(weights)
            if consensus:
                mask = _consensus_mask(deltas)
                mixed = (deltas * mask).sum(dim=0)
                divisor = (weights * mask).sum(dim=0)
                divisor[divisor == 0] = 1
            else:
                mixed = deltas.sum(dim=0)
                divisor = weights.sum(dim=0)
                divisor[divisor.abs() < NORMALIZE_EPS] = 1
            if m.normalize:
                mixed /= divisor
            if m.lambda_ != 1:
                mixed *= m.lambda_
            out[rows] = (start + mixed).to(base.dtype)
            del deltas, mixed
        return out

    return merge


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two tensors seen as flat vectors (t=0 gives v0)."""
    work = _float_work_dtype(v0)
    a = v0.reshape(-1).to(work)
    b = v1.reshape(-1).to(work)
    if a.numel() == 0:
        return v0.clone()
    norm_a = torch.linalg.vector_norm(a)
    norm_b = torch.linalg.vector_norm(b)
    norm_a = norm_a if norm_a > SLERP_EPS else torch.ones_like(norm_a)
    norm_b = norm_b if norm_b > SLERP_EPS else torch.ones_like(norm_b)
    dot = ((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1)
    if dot.abs() > SLERP_DOT_THRESHOLD:
        coef_a, coef_b = 1 - t, t
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        coef_a = torch.sin((1 - t) * theta) / sin_theta
        coef_b = torch.sin(t * theta) / sin_theta
    return (coef_a * a + coef_b * b).reshape(v0.shape).to(v0.dtype)


def slerp(m: TensorMerge) -> torch.Tensor:
    (other,) = m.others()
    return slerp_tensors(m.t, m.base, m.tensors[other])


def model_stock(m: TensorMerge) -> torch.Tensor:
    w0 = m.base
    ws = [m.tensors[i] for i in m.others()]
    shape = w0.shape
    if m.filter_wise:
        if w0.dim() == 1:
            w0 = w0.unsqueeze(0)
            ws = [w.unsqueeze(0) for w in ws]
    else:
        w0 = w0.reshape(-1)
        ws = [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, first in enumerate(offsets):
        for second in offsets[i + 1 :]:
            norms = torch.norm(first, dim=-1) * torch.norm(second, dim=-1)
            cosines.append(((first * second).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos_theta
    # Opposed updates (denominator ~ 0) have no finite estimate: keep the base there.
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos_theta), count * cos_theta / torch.where(singular, 1, denominator))
    average = sum(ws) / count
    return (t * average + (1 - t) * w0).reshape(shape)


_SPARSIFIED = ("normalize", "lambda", "rescale")  # the task-vector methods that drop entries


@functools.cache
def merge_method_registry() -> Registry[MergeMethod]:
    registry: Registry[MergeMethod] = Registry("merge method")
    for method in (
        MergeMethod(
            "linear", linear, "ignored", 1, None, default_normalize=True, default_rescale=False, elementwise=True,
            options=("normalize",),
        ),
        MergeMethod(
            "task_arithmetic", _task_vectors(None, False), "required", 1, None, False, False, elementwise=True,
            options=("normalize", "lambda"),
        ),
        MergeMethod(
            "ties", _task_vectors("magnitude", True), "required", 1, None, True, False, uses_density=True,
            options=_SPARSIFIED + ("tie_break",),
        ),
        MergeMethod(
            "dare_ties", _task_vectors("random", True), "required", 1, None, False, True, uses_density=True, randomized=True,
            options=_SPARSIFIED + ("seed",),
        ),
        MergeMethod(
            "dare_linear", _task_vectors("random", False), "required", 1, None, False, True, uses_density=True, randomized=True,
            options=_SPARSIFIED + ("seed",),
        ),
        MergeMethod(
            "breadcrumbs",
            _task_vectors("magnitude_outliers", False),
            "required",
            1,
            None,
            False,
            False,
            uses_density=True,
            uses_gamma=True,
            options=_SPARSIFIED + ("tie_break",),
        ),
        MergeMethod("slerp", slerp, "required", 2, 2, False, False, uses_weight=False, uses_t=True),
        MergeMethod("model_stock", model_stock, "required", 3, None, False, False, uses_weight=False, options=("filter_wise",)),
    ):
        registry.register(method.name, method)
    return registry.freeze()
