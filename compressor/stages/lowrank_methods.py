"""The `lowrank.method` registry.

- ``eora``: closed-form compensation of each compressed layer's error W − Ŵ, weighted by the
  layer's calibration input covariance (gathered through the layer-by-layer engine); the
  factors are attached to the QuantLinear and saved as a peft adapter.
- ``svd``: replace dense Linear layers by two smaller factors where that shrinks them.
- ``lora``: train LoRA adapters with peft on top of the frozen (compressed) model.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from compressor.algorithms.gptq import HessianAccumulator
from compressor.algorithms.lowrank import eora_factors, shrinks, svd_factors, weighted_error
from compressor.errors import RecipeError
from compressor.kernels.lowrank import FactorizedLinear, attach_compensation, compensations
from compressor.kernels.quant_linear import QuantLinear
from compressor.input_statistics import InputStatisticsAlgorithm
from compressor.layerwise import run_layerwise
from compressor.registry import Registry
from compressor.stages.base import Locator, StageContext, StagePlan, replace_module
from compressor.training.stability import default_warmup_steps, warmup_problem

DEFAULT_RANK = 32


@dataclass(frozen=True)
class Verdict:
    selected: bool
    detail: str


class LowRankMethod(Protocol):
    calibrated: bool
    keys: frozenset[str]  # recipe keys this method reads, besides method/targets/ignore
    default_rank: int | None  # the rank when the recipe gives none

    def check_config(self, config: Any, locate: Locator) -> None: ...

    def plan_module(self, name: str, module: nn.Module, config: Any) -> Verdict: ...

    def run(self, model: nn.Module, config: Any, ctx: StageContext, plan: StagePlan) -> nn.Module: ...


def _record(ctx: StageContext, name: str, entry: dict[str, Any]) -> None:
    ctx.records.setdefault(name, {}).setdefault("lowrank", []).append(entry)


def _rank(config) -> int:
    return config.rank if config.rank is not None else DEFAULT_RANK


def _dense_or_quantized(name: str, module: nn.Module, config) -> Verdict:
    if isinstance(module, (nn.Linear, QuantLinear)):
        rank = _rank(config)
        return Verdict(True, f"rank {rank}: +{rank * (module.in_features + module.out_features)} parameters")
    return Verdict(False, f"{type(module).__name__} is not a Linear layer")


# ---------------------------------------------------------------- eora


def _where(ctx: StageContext, key: str) -> dict[str, str]:
    """The recipe location of this stage's `key`, for errors only the run can find."""
    return ctx.locate(key) if ctx.locate is not None else {"key": f"lowrank.{key}"}


class _EoRABlockAlgorithm(InputStatisticsAlgorithm):
    """Input covariances of one block's compressed layers, then their EoRA factors."""

    def __init__(self, modules: dict[str, QuantLinear], config, ctx: StageContext, originals):
        super().__init__(modules, HessianAccumulator, self._compensate_group)
        self.config = config
        self.ctx = ctx
        self.originals = originals

    def _compensate_group(self, group: list[str], covariance: HessianAccumulator) -> None:
        for module_name in group:  # q/k/v (gate/up) read one tensor and share its covariance
            self._compensate(module_name, covariance.hessian)

    def _compensate(self, module_name: str, covariance: torch.Tensor) -> None:
        started = time.perf_counter()
        module = self.modules[module_name]
        original = self.originals[f"{module_name}.weight"].float().to(covariance.device)
        if tuple(original.shape) != (module.out_features, module.in_features):
            raise RecipeError(
                f"the original weight of {module_name} is {tuple(original.shape)}, the layer is"
                f" {(module.out_features, module.in_features)}: `original` is not this model's source",
                **_where(self.ctx, "original"),
            )
        delta = original - module.dequantized_weight(torch.float32).to(covariance.device)
        existing = getattr(module, "lowrank", None)
        if existing is not None:  # compensate what an earlier low-rank stage left
            delta = delta - existing.B.float() @ existing.A.float()
        factors = eora_factors(delta, covariance, _rank(self.config), self.config.eigen_floor)
        dtype = module.weight_scale.dtype
        a, b = factors.a.to(dtype), factors.b.to(dtype)
        before = weighted_error(delta, covariance)
        after = weighted_error(delta - b.float() @ a.float(), covariance)
        attach_compensation(module, a.to(module.weight_packed.device), b.to(module.weight_packed.device), "eora")
        _record(
            self.ctx,
            module_name,
            {
                "method": "eora",
                "rank": factors.rank,
                "weighted_error_before": before,
                "weighted_error_after": after,
                "seconds": round(time.perf_counter() - started, 4),
            },
        )


class EoRAMethod:
    calibrated = True
    keys = frozenset({"rank", "original", "eigen_floor"})
    default_rank = DEFAULT_RANK

    def check_config(self, config, locate: Locator) -> None:
        """A missing `original` fails here, at plan time, not after the earlier stages ran."""
        from compressor.errors import ModelError
        from compressor.model_io import resolve_model

        if config.original is None or Path(config.original).expanduser().is_dir():
            return
        try:
            resolve_model(config.original)
        except ModelError as err:
            raise RecipeError(f"{config.original}: {err.message}", **locate("original")) from None

    def plan_module(self, name: str, module: nn.Module, config) -> Verdict:
        return _dense_or_quantized(name, module, config)

    def run(self, model, config, ctx: StageContext, plan: StagePlan):
        from compressor.original_weights import original_weights_for

        modules = {n: model.get_submodule(n) for n in plan.selected}
        quantized = {n: m for n, m in modules.items() if isinstance(m, QuantLinear)}
        if not quantized:
            raise RecipeError(
                "lowrank eora compensates compressed layers, and none of its targets is quantized:"
                " put a quantize stage before it",
                **_where(ctx, "method"),
            )
        for name in modules.keys() - quantized.keys():
            plan.skipped[name] = "not compressed: nothing to compensate"
            del plan.selected[name]
        reference = config.original or getattr(model.config, "_name_or_path", None)
        if not reference:
            raise RecipeError("cannot tell where the original weights are; set `original:`", **_where(ctx, "original"))
        algorithm = _EoRABlockAlgorithm(quantized, config, ctx, original_weights_for(reference))
        run_layerwise(
            model,
            ctx.calibration(),
            algorithm,
            batch_size=ctx.batch_size,
            device=ctx.device,
            description="eora",
            show_progress=ctx.show_progress,
        )
        return model


# ---------------------------------------------------------------- svd


class SVDMethod:
    calibrated = False
    keys = frozenset({"rank", "energy"})
    default_rank = None

    def check_config(self, config, locate: Locator) -> None:
        if (config.rank is None) == (config.energy is None):
            raise RecipeError("svd needs exactly one of `rank` and `energy`", **locate("rank" if config.rank else "method"))

    def plan_module(self, name: str, module: nn.Module, config) -> Verdict:
        if isinstance(module, QuantLinear):
            return Verdict(False, "already quantized: factorize before the quantize stage")
        if not isinstance(module, nn.Linear):
            return Verdict(False, f"{type(module).__name__} is not a Linear layer")
        if config.rank is not None:
            if not shrinks(module.in_features, module.out_features, config.rank):
                return Verdict(False, f"rank {config.rank} would not shrink a {module.out_features}×{module.in_features} layer")
            saved = module.in_features * module.out_features - config.rank * (module.in_features + module.out_features)
            return Verdict(True, f"rank {config.rank}: −{saved} parameters")
        return Verdict(True, f"energy {config.energy} (rank from the spectrum; kept only where it shrinks the layer)")

    def run(self, model, config, ctx: StageContext, plan: StagePlan):
        for name in list(plan.selected):
            module = model.get_submodule(name)
            weight = module.weight.data
            factors = svd_factors(weight, rank=config.rank, energy=config.energy)
            if not shrinks(module.in_features, module.out_features, factors.rank):
                plan.skipped[name] = f"energy {config.energy} needs rank {factors.rank}, which would not shrink the layer"
                del plan.selected[name]
                continue
            dtype = weight.dtype
            new = FactorizedLinear(factors.a.to(dtype), factors.b.to(dtype), module.bias.data if module.bias is not None else None)
            with torch.no_grad():
                error = float((new.dense_weight().float() - weight.float()).norm() / weight.float().norm().clamp_min(1e-12))
            replace_module(model, name, new.to(weight.device))
            _record(ctx, name, {"method": "svd", "rank": factors.rank, "relative_error": error})
        return model


# ---------------------------------------------------------------- lora


class LoRAMethod:
    calibrated = True
    keys = frozenset({"rank", "alpha", "dropout", "steps", "lr", "batch_size", "seed", "dataset", "max_grad_norm", "warmup_steps"})
    default_rank = DEFAULT_RANK

    def check_config(self, config, locate: Locator) -> None:
        if config.warmup_steps is not None and (problem := warmup_problem(config.warmup_steps, config.steps)):
            raise RecipeError(problem, **locate("warmup_steps"))

    def plan_module(self, name: str, module: nn.Module, config) -> Verdict:
        return _dense_or_quantized(name, module, config)

    def run(self, model, config, ctx: StageContext, plan: StagePlan):
        from compressor.lora_training import train_lora_on

        tokens = ctx.calibration() if config.dataset is None else _dataset_tokens(config.dataset, ctx)
        rank = _rank(config)
        warmup_steps = config.warmup_steps if config.warmup_steps is not None else default_warmup_steps(config.steps)
        result = train_lora_on(
            model,
            list(plan.selected),
            tokens,
            rank=rank,
            alpha=config.alpha if config.alpha is not None else 2.0 * rank,
            dropout=config.dropout,
            steps=config.steps,
            lr=config.lr,
            batch_size=config.batch_size,
            seed=config.seed,
            max_grad_norm=config.max_grad_norm,
            warmup_steps=warmup_steps,
        )
        training = {
            "first_loss": result.losses[0], "last_loss": result.losses[-1], "warmup_steps": warmup_steps,
            "max_grad_norm": config.max_grad_norm, "largest_grad_norm": max(result.grad_norms),  # before clipping
        }
        for name, compensation in compensations(model).items():
            if name in plan.selected:
                _record(ctx, name, {"method": "lora", "rank": rank, **training})
        return model


def _dataset_tokens(spec, ctx: StageContext) -> torch.Tensor:
    from compressor.cache import cache_root
    from compressor.calibration.batches import build_calibration

    return build_calibration(spec, ctx.tokenizer, cache_root() / "calibration")


@functools.cache
def lowrank_method_registry() -> Registry[LowRankMethod]:
    registry: Registry[LowRankMethod] = Registry("lowrank method")
    registry.register("eora", EoRAMethod())
    registry.register("svd", SVDMethod())
    registry.register("lora", LoRAMethod())
    return registry.freeze()
