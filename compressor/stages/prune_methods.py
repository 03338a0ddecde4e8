"""The `prune.method` registry for unstructured and N:M sparsity.

- ``magnitude``: drop the smallest |W| (per layer for unstructured, per group for N:M); no data.
- ``wanda``: |W| · ‖X_j‖ with input norms from the layer-by-layer engine; no weight update.
- ``sparsegpt``: OBS pruning with weight updates from the inputs' Hessian. Layers that read the
  same input (q/k/v, gate/up) share one Hessian and one inverse factorization, and are then
  pruned one by one, so each layer gets exactly its own sparsity.

A layer's target is a float (unstructured sparsity) or an NMPattern. After pruning, the Linear
keeps its dense weight (exact zeros) and carries ``sparsity_structure`` so that a later GPTQ
keeps the mask and the checkpoint writer can store it compressed.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Protocol

import torch
from torch import nn

from compressor.algorithms.gptq import HessianAccumulator
from compressor.algorithms.masks import NMPattern, measured_sparsity, nm_mask, unstructured_mask
from compressor.algorithms.sparsegpt import HessianFactor, factor_hessian, sparsegpt_prune
from compressor.algorithms.wanda import ColumnNormAccumulator, wanda_prune
from compressor.input_statistics import run_statistics
from compressor.registry import Registry
from compressor.stages.base import StageContext

LayerTarget = float | NMPattern

SPARSITY_ATTRIBUTE = "sparsity_structure"


def mark_pruned(module: nn.Module, target: LayerTarget) -> None:
    setattr(module, SPARSITY_ATTRIBUTE, str(target) if isinstance(target, NMPattern) else "unstructured")


def _split(target: LayerTarget) -> tuple[float | None, NMPattern | None]:
    return (None, target) if isinstance(target, NMPattern) else (float(target), None)


def _record(ctx: StageContext, name: str, method: str, module: nn.Module, target: LayerTarget, seconds: float, **extra) -> None:
    ctx.records[name] = {
        "stage": "prune",
        "method": method,
        "target": str(target) if isinstance(target, NMPattern) else round(float(target), 4),
        "sparsity": round(measured_sparsity(module.weight.data), 4),
        "seconds": round(seconds, 4),
        **extra,
    }


class PruneMethod(Protocol):
    calibrated: bool

    def prune(self, model: nn.Module, modules: dict[str, nn.Linear], targets: dict[str, LayerTarget], config: Any, ctx: StageContext) -> None: ...


def _prune_by_magnitude(module: nn.Linear, target: LayerTarget) -> None:
    sparsity, pattern = _split(target)
    scores = module.weight.data.float().abs()
    keep = nm_mask(scores, pattern) if pattern else unstructured_mask(scores, sparsity, per_row=False)
    module.weight.data.mul_(keep.to(module.weight.dtype))
    mark_pruned(module, target)


def _magnitude_for_unseen(modules, targets, ctx: StageContext, method: str) -> Callable[[str], None]:
    """For a layer no calibration token reached (an MoE expert the router never chose), which
    the calibrated methods have no statistics for: magnitude pruning, recorded as a fallback."""
    def solve_unseen(name: str) -> None:
        started = time.perf_counter()
        _prune_by_magnitude(modules[name], targets[name])
        _record(ctx, name, method, modules[name], targets[name], time.perf_counter() - started,
                fallback="magnitude: no calibration token reached this layer")
    return solve_unseen


class MagnitudeMethod:
    calibrated = False

    def prune(self, model, modules, targets, config, ctx) -> None:
        for name, module in modules.items():
            started = time.perf_counter()
            _prune_by_magnitude(module, targets[name])
            _record(ctx, name, "magnitude", module, targets[name], time.perf_counter() - started)


class WandaMethod:
    calibrated = True

    def prune(self, model, modules, targets, config, ctx) -> None:
        def solve(names: list[str], norms: ColumnNormAccumulator) -> None:
            for name in names:
                started = time.perf_counter()
                module = modules[name]
                sparsity, pattern = _split(targets[name])
                module.weight.data = wanda_prune(module.weight.data, norms.norms(), sparsity=sparsity, pattern=pattern)
                mark_pruned(module, targets[name])
                _record(ctx, name, "wanda", module, targets[name], time.perf_counter() - started)

        run_statistics(model, modules, ColumnNormAccumulator, solve, ctx, "wanda",
                       _magnitude_for_unseen(modules, targets, ctx, "wanda"))


class SparseGPTMethod:
    calibrated = True

    def prune(self, model, modules, targets, config, ctx) -> None:
        def solve(names: list[str], accumulator: HessianAccumulator) -> None:
            started = time.perf_counter()
            factor: HessianFactor = factor_hessian(accumulator.hessian, config.dampening)
            shared = time.perf_counter() - started
            for name in names:
                started = time.perf_counter()
                module = modules[name]
                sparsity, pattern = _split(targets[name])
                result = sparsegpt_prune(module.weight.data, factor, sparsity=sparsity, pattern=pattern, block_size=config.block_size)
                module.weight.data = result.weight
                mark_pruned(module, targets[name])
                _record(
                    ctx, name, "sparsegpt", module, targets[name], time.perf_counter() - started + shared,
                    damping=factor.damping, sparsegpt_error=result.error, fallback=result.fallback,
                    solved_with=names,
                )

        def exact_hessian(in_features: int, device: torch.device) -> HessianAccumulator:
            return HessianAccumulator(in_features, device, float32_products=True)

        run_statistics(model, modules, exact_hessian, solve, ctx, "sparsegpt",
                       _magnitude_for_unseen(modules, targets, ctx, "sparsegpt"))


@functools.cache
def prune_method_registry() -> Registry[PruneMethod]:
    registry: Registry[PruneMethod] = Registry("prune method")
    registry.register("magnitude", MagnitudeMethod())
    registry.register("wanda", WandaMethod())
    registry.register("sparsegpt", SparseGPTMethod())
    return registry.freeze()
