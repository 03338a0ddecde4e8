"""OWL schedule: one calibration pass over the dense model measures each decoder block's
outlier ratio of Wanda scores; blocks rich in outliers are pruned less (see algorithms/wanda.py)."""

from __future__ import annotations

from collections import defaultdict

from torch import nn

from compressor.algorithms.wanda import ColumnNormAccumulator, outlier_ratio, owl_sparsities, wanda_scores
from compressor.layerwise import find_decoder_blocks
from compressor.stages.base import StageContext
from compressor.stages.prune_methods import LayerTarget, run_statistics


def block_of(name: str, blocks_name: str) -> int:
    return int(name[len(blocks_name) + 1 :].split(".", 1)[0])


def owl_targets(model: nn.Module, modules: dict[str, nn.Linear], config, ctx: StageContext) -> dict[str, LayerTarget]:
    blocks_name, _ = find_decoder_blocks(model)
    counts: dict[int, list[int]] = defaultdict(lambda: [0, 0])  # block → [outliers, scores]

    def solve(names: list[str], norms: ColumnNormAccumulator) -> None:
        for name in names:
            scores = wanda_scores(modules[name].weight.data, norms.norms())
            tally = counts[block_of(name, blocks_name)]
            tally[0] += round(outlier_ratio([scores], config.owl.threshold) * scores.numel())
            tally[1] += scores.numel()

    run_statistics(model, modules, ColumnNormAccumulator, solve, ctx, "owl outliers")
    ratios = {index: outliers / total for index, (outliers, total) in counts.items()}
    order = sorted(ratios)
    sparsities = dict(zip(order, owl_sparsities([ratios[i] for i in order], float(config.sparsity), config.owl.spread)))
    for index in order:
        ctx.records[f"{blocks_name}.{index}"] = {
            "stage": "prune", "schedule": "owl", "outlier_ratio": round(ratios[index], 5), "sparsity": round(sparsities[index], 4)
        }
    return {name: sparsities[block_of(name, blocks_name)] for name in modules}
