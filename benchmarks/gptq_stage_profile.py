#!/usr/bin/env python
"""Where the GPTQ stage's time goes on SmolLM2-135M-Instruct, against one bf16 forward pass.

    python benchmarks/gptq_stage_profile.py [--samples 128] [--seq-len 512] [--json out.json]

In one process: time one bf16 forward over the calibration windows (one window per call, as
gptq_smollm2.py does), then run the GPTQ W4 g64 stage with timers around its parts: the
sequential block passes (`SequentialBlockPass.run`) and, inside them, the Hessian products
(`HessianAccumulator.add`), the GPTQ solves and the dequantization of packed weights; the
block forwards are the sequential passes' time less those three. The layout check and
the two-pass engine (used by blocks of another shape; none in SmolLM2) are timed too.
Then two small measurements that need no calibration run:
- one decoder block over the same 16 windows in chunks of 1, 2, 4, 8 and 16 windows;
- the solve of one block's four matrices (q/k/v stacked, o, gate/up stacked, down) with the
  32-column sub-blocks and, for comparison, with per-column updates over the whole 128-column
  block (the loop before the sub-blocks; same sums).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from compressor import layerwise  # noqa: E402
from compressor.algorithms import gptq  # noqa: E402
from compressor.algorithms.grid import WeightGrid  # noqa: E402
from compressor.cache import cache_root  # noqa: E402
from compressor.calibration.batches import build_calibration  # noqa: E402
from compressor.kernels import quant_linear  # noqa: E402
from compressor.model_io import load_model  # noqa: E402
from compressor.recipe import CalibrationSpec, parse_recipe_text  # noqa: E402
from compressor import sequential_block  # noqa: E402
from compressor.stages import quant_methods  # noqa: E402
from compressor.stages.base import StageContext  # noqa: E402
from compressor.stages.quantize import QuantizeStage  # noqa: E402

MODEL = "builtin:smollm2-135m-instruct"


def timed(totals: collections.Counter, key: str, function):
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - started

    return wrapper


@torch.no_grad()
def block_chunk_seconds(model, tokens: torch.Tensor) -> dict[int, float]:
    """Best of three: block 3 over 16 windows, fed in chunks of 1..16 windows."""
    _, blocks = layerwise.find_decoder_blocks(model)
    windows = tokens[:16]
    inputs = {size: layerwise.capture_block_inputs(model, blocks[0], windows, size) for size in (1, 2, 4, 8, 16)}
    best = {}
    for size, captured in inputs.items():
        runs = []
        for _ in range(3):
            started = time.perf_counter()
            for hidden, kwargs in zip(captured.hidden, captured.kwargs):
                blocks[3](hidden, **kwargs)
            runs.append(time.perf_counter() - started)
        best[size] = round(min(runs), 3)
    return best


def solve_seconds(inner_block: int) -> float:
    """One SmolLM2 block's four GPTQ solves on random weights and Hessians (W4, group 64 / 128)."""
    generator = torch.Generator().manual_seed(0)
    shapes = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
    saved = gptq._INNER_BLOCK
    gptq._INNER_BLOCK = inner_block
    try:
        total = 0.0
        for rows, columns in shapes.values():
            x = torch.randn(4096, columns, generator=generator) * torch.linspace(0.1, 2, columns)
            hessian = 2 * x.t() @ x / 4096
            weight = (torch.randn(rows, columns, generator=generator) * 0.05).bfloat16()
            started = time.perf_counter()
            gptq.gptq_quantize(weight, hessian, WeightGrid(4, True, 64 if columns == 576 else 128), block_size=128)
            total += time.perf_counter() - started
    finally:
        gptq._INNER_BLOCK = saved
    return round(total, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    totals: collections.Counter = collections.Counter()
    gptq.HessianAccumulator.add = timed(totals, "hessian_products", gptq.HessianAccumulator.add)
    quant_methods.gptq_quantize = timed(totals, "gptq_solves", quant_methods.gptq_quantize)
    sequential_block.SequentialBlockPass.run = timed(totals, "sequential_passes", sequential_block.SequentialBlockPass.run)
    layerwise.follows_layout = timed(totals, "layout_check", layerwise.follows_layout)
    layerwise._two_passes = timed(totals, "two_pass_engine", layerwise._two_passes)
    quant_linear.QuantLinear.dequantized_weight = timed(totals, "dequantize", quant_linear.QuantLinear.dequantized_weight)

    loaded = load_model(MODEL)
    model, tokenizer = loaded.model, loaded.tokenizer
    tokens = build_calibration(CalibrationSpec(samples=args.samples, seq_len=args.seq_len), tokenizer, cache_root() / "calibration")
    chunks = block_chunk_seconds(model, tokens)
    with torch.no_grad():
        started = time.perf_counter()
        for window in tokens.split(1):
            model(input_ids=window, use_cache=False)
        forward_s = time.perf_counter() - started

    recipe = parse_recipe_text("name: profile\nstages:\n  - quantize: {method: gptq, weights: {bits: 4, group_size: 64}, act_order: true}\n")
    config = recipe.stages[0].config
    stage = QuantizeStage()
    plan = stage.plan(model, config, lambda *k: {"where": "profile", "key": "quantize"})
    ctx = StageContext(tokenizer=tokenizer, calibration=lambda: tokens, device=torch.device("cpu"), show_progress=False)
    started = time.perf_counter()
    stage.run(model, config, ctx, plan)
    stage_s = time.perf_counter() - started

    nested = totals["hessian_products"] + totals["gptq_solves"] + totals["dequantize"]
    parts = {key: round(value, 1) for key, value in totals.most_common()}
    parts["block forwards (sequential passes less Hessians, solves, dequantize)"] = round(totals["sequential_passes"] - nested, 1)
    outer = totals["sequential_passes"] + totals["layout_check"] + totals["two_pass_engine"]
    parts["rest (capturing the first block's inputs, packing, ...)"] = round(stage_s - outer, 1)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}",
        "calibration": f"{args.samples}x{args.seq_len} builtin:abstracts",
        "bf16_forward_s": round(forward_s, 1),
        "gptq_stage_s": round(stage_s, 1),
        "ratio_to_forward": round(stage_s / forward_s, 3),
        "stage_parts_s": parts,
        "block_16_windows_s_by_chunk": chunks,
        "one_block_solves_s": {"32-column sub-blocks": solve_seconds(32), "per-column updates over 128 columns": solve_seconds(128)},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
