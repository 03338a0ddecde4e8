"""What a quantize stage records about how each layer's scales were found, in compressed-tensors'
terms (``QuantizationArgs.actorder`` / ``observer`` / ``observer_kwargs``), for the saved config.

- ``actorder: static``: GPTQ visited the columns in act order with static groups (no ``g_idx``),
  what llm-compressor's GPTQModifier writes by default. Absent when the columns went in order,
  when no GPTQ ran (rtn, hqq, awq with then: rtn, FP8 weights) or when GPTQ fell back to RTN.
- ``observer``: ``minmax`` and ``mse`` are the names llm-compressor's observers have. ``mse``
  carries ``observer_kwargs`` in that observer's terms (it tries the clip ratios
  ``1 - i / grid`` for ``i < maxshrink × grid`` and stops after ``patience`` tries without a
  gain), which reproduce exactly the ratios ours tried. ``hqq`` has no compressed-tensors or
  llm-compressor name: it is written as ``hqq`` with HQQ's own parameters, a truthful label that
  loaders ignore (transformers and vLLM read no observer) and llm-compressor would not run again.
"""

from __future__ import annotations

from typing import Any

from compressor.algorithms import fp8, grid, hqq
from compressor.formats import WeightCalibration

# llm-compressor's `mse` observer minimises the error to the power `norm`; ours the squared error.
_SQUARED_ERROR = 2.0


def shrink_search_kwargs(steps: int, lowest: float) -> dict[str, Any]:
    """`observer_kwargs` of llm-compressor's mse observer that try our `steps` ratios 1.0 … `lowest`."""
    grid_points = round((steps - 1) / (1.0 - lowest))
    # patience = steps: ours never stops early (tests check int(maxshrink × grid) == steps)
    return {"grid": grid_points, "maxshrink": steps / grid_points, "norm": _SQUARED_ERROR, "patience": steps}


def _observer_kwargs(observer: str, float_weights: bool) -> dict[str, Any]:
    if observer == "mse":
        if float_weights:
            return shrink_search_kwargs(fp8.MSE_SHRINK_STEPS, fp8.MSE_LOWEST_FRACTION)
        return shrink_search_kwargs(grid.MSE_SHRINK_STEPS, grid.MSE_LOWEST_RATIO)
    if observer == "hqq":
        return {"lp_norm": hqq.LP_NORM, "beta": hqq.BETA, "kappa": hqq.KAPPA, "iterations": hqq.ITERATIONS}
    return {}


def weight_calibration(observer: str, *, float_weights: bool, act_order_ran: bool) -> WeightCalibration:
    """The record for a layer quantized with `observer`; `act_order_ran`: GPTQ solved it in act order."""
    kwargs = _observer_kwargs(observer, float_weights)
    return WeightCalibration(
        actorder="static" if act_order_ran else None,
        observer=observer,
        observer_kwargs=tuple(sorted(kwargs.items())),
    )
