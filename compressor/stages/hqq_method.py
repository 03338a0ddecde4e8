"""`quantize.method: hqq`: calibration-free; each group's scale and zero point come from
half-quadratic optimisation of the weight error (compressor.algorithms.hqq), then the
weights are rounded to nearest on that grid. The same search is available under `rtn` and
`gptq` as `weights.observer: hqq`.
"""

from __future__ import annotations

from compressor.stages.base import StageContext


class HQQMethod:
    calibrated = False
    layer_class = "QuantLinear"

    def quantize(self, model, modules, grids, config, ctx: StageContext) -> None:
        from compressor.stages.quant_methods import RTNMethod

        RTNMethod().quantize(model, modules, grids, config, ctx)
        for name in modules:
            ctx.records[name].update(method="hqq", hqq_search=grids[name].hqq_search)
