"""The `quantize.method` registry: how each method turns Linear layers into QuantLinear.

- ``rtn``: round to nearest, no calibration data.
- ``gptq``: GPTQ through the layer-by-layer engine. Layers that read the same input (q/k/v,
  gate/up) share one Hessian and are solved together as one stacked matrix: GPTQ treats
  rows independently, so the result equals solving them one by one, at a fraction of the cost.
- ``smoothquant`` / ``smoothquant+gptq`` / ``fp8``: W8A8 and FP8 layers (activation_methods.py).
- ``nf4``: bitsandbytes NF4 (nf4_method.py).
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from typing import Any, Protocol

import torch
from torch import nn

from compressor.algorithms.gptq import GPTQResult, HessianAccumulator, gptq_quantize
from compressor.algorithms.grid import WeightGrid
from compressor.algorithms.rtn import rtn_quantize
from compressor.kernels.quant_linear import QuantLinear
from compressor.input_statistics import InputStatisticsAlgorithm
from compressor.layerwise import run_layerwise
from compressor.registry import Registry
from compressor.stages.activation_methods import ActivationQuantMethod
from compressor.stages.nf4_method import NF4Method
from compressor.stages.base import StageContext, replace_module


class QuantMethod(Protocol):
    calibrated: bool
    layer_class: str  # what each quantized Linear becomes (what a later distill stage can train on it)

    def quantize(
        self, model: nn.Module, modules: dict[str, nn.Linear], grids: dict[str, WeightGrid], config: Any, ctx: StageContext
    ) -> None: ...


def _to_quant_linear(module: nn.Linear, codes, scale, zero, grid: WeightGrid) -> QuantLinear:
    return QuantLinear.from_codes(
        codes,
        scale,
        zero.to(torch.int8) if zero is not None else None,
        bits=grid.bits,
        group_size=grid.group_size,
        bias=module.bias,
        dtype=module.weight.dtype,
    )


def _grid_record(grid: WeightGrid) -> dict[str, Any]:
    return {"bits": grid.bits, "group_size": grid.group_size, "symmetric": grid.symmetric, "mse_search": grid.mse_search}


def _replace_with_rtn(model: nn.Module, name: str, module: nn.Linear, grid: WeightGrid) -> None:
    codes, scale, zero = rtn_quantize(module.weight.data, grid)
    replace_module(model, name, _to_quant_linear(module, codes, scale, zero, grid))


class RTNMethod:
    calibrated = False
    layer_class = "QuantLinear"

    def quantize(self, model, modules, grids, config, ctx) -> None:
        for name, module in modules.items():
            _replace_with_rtn(model, name, module, grids[name])
            ctx.records[name] = {"stage": "quantize", "method": "rtn", **_grid_record(grids[name])}


class _GPTQBlockAlgorithm(InputStatisticsAlgorithm):
    """Hessians for one block's targets, then GPTQ on each group of layers sharing an input.
    Sequential: each group's Hessian comes from the outputs of the groups already quantized."""

    sequential = True

    def __init__(self, model: nn.Module, modules: dict[str, nn.Linear], grids: dict[str, WeightGrid], config, ctx):
        super().__init__(modules, HessianAccumulator, self._solve_group, self._solve_unseen)
        self.model = model
        self.grids = grids
        self.config = config
        self.ctx = ctx

    def _solve_group(self, group: list[str], accumulator: HessianAccumulator) -> None:
        # Layers sharing an input share the Hessian; those with one grid are solved stacked.
        by_grid: dict[WeightGrid, list[str]] = defaultdict(list)
        for module_name in group:
            by_grid[self.grids[module_name]].append(module_name)
        for grid, names in by_grid.items():
            self._solve(names, grid, accumulator.hessian, len(group) > 1)

    def _solve_unseen(self, module_name: str) -> None:
        """A layer no calibration token reached (an MoE expert the router never chose): RTN."""
        grid = self.grids[module_name]
        _replace_with_rtn(self.model, module_name, self.modules[module_name], grid)
        self.ctx.records[module_name] = {
            "stage": "quantize", "method": "gptq", **_grid_record(grid),
            "fallback": "rtn: no calibration token reached this layer",
        }

    def _solve(self, names: list[str], grid: WeightGrid, hessian: torch.Tensor, shared: bool) -> None:
        started = time.perf_counter()
        weights = [self.modules[n].weight.data for n in names]
        result: GPTQResult = gptq_quantize(
            torch.cat(weights, dim=0),
            hessian,
            grid,
            block_size=self.config.block_size,
            dampening=self.config.dampening,
            act_order=self.config.act_order,
            keep_mask=_sparsity_mask(names, weights, self.modules),
        )
        seconds = time.perf_counter() - started
        row = 0
        for module_name, weight in zip(names, weights):
            rows = slice(row, row + weight.shape[0])
            row += weight.shape[0]
            zero = result.zero[rows] if result.zero is not None else None
            module = self.modules[module_name]
            new = _to_quant_linear(module, result.codes[rows], result.scale[rows], zero, grid)
            replace_module(self.model, module_name, new)
            self.ctx.records[module_name] = {
                "stage": "quantize",
                "method": "gptq",
                **_grid_record(grid),
                "act_order": self.config.act_order,
                "damping": result.damping,
                "gptq_error": result.error,
                "fallback": result.fallback,
                "solved_with": names if shared else [module_name],
                "seconds": round(seconds, 4),
            }


def _sparsity_mask(names: list[str], weights: list[torch.Tensor], modules: dict[str, nn.Module]) -> torch.Tensor | None:
    """The non-zero pattern of layers a prune stage left sparse (`sparsity_structure`), else None."""
    if not any(getattr(modules[n], "sparsity_structure", None) for n in names):
        return None
    return torch.cat([w != 0 for w in weights], dim=0)


class GPTQMethod:
    calibrated = True
    layer_class = "QuantLinear"
    streams_blocks = True  # weights are read block by block inside run_layerwise

    def quantize(self, model, modules, grids, config, ctx) -> None:
        algorithm = _GPTQBlockAlgorithm(model, modules, grids, config, ctx)
        run_layerwise(
            model,
            ctx.calibration(),
            algorithm,
            batch_size=ctx.batch_size,
            device=ctx.device,
            description="gptq",
            show_progress=ctx.show_progress,
        )


@functools.cache
def quant_method_registry() -> Registry[QuantMethod]:
    registry: Registry[QuantMethod] = Registry("quantize method")
    registry.register("rtn", RTNMethod())
    registry.register("gptq", GPTQMethod())
    from compressor.stages.awq_method import AWQMethod
    from compressor.stages.hqq_method import HQQMethod

    registry.register("awq", AWQMethod())
    registry.register("hqq", HQQMethod())
    registry.register("smoothquant", ActivationQuantMethod(smoothing=True, solver="rtn"))
    registry.register("smoothquant+gptq", ActivationQuantMethod(smoothing=True, solver="gptq"))
    registry.register("fp8", ActivationQuantMethod(smoothing=False, solver="rtn"))
    registry.register("nf4", NF4Method())
    return registry.freeze()
