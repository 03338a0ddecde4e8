#!/usr/bin/env python
"""FP8 e4m3 weight error on SmolLM2-135M-Instruct: min-max per-channel scales against `observer: mse`.

    python benchmarks/fp8_weight_error.py [--layers 3,20]

For every Linear of the chosen decoder blocks, the relative squared error of the dequantized FP8
weight, sum (Q(W) - W)² / sum W², with the plain scale and with the MSE scale search
(compressor.algorithms.fp8.fp8_quantize). No data, no forward passes: seconds of CPU.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from compressor.algorithms.fp8 import fp8_quantize  # noqa: E402
from compressor.model_io import load_model  # noqa: E402


def relative_error(weight: torch.Tensor, mse: bool) -> float:
    codes, scale = fp8_quantize(weight, weight.dtype, mse_search=mse)
    w = weight.float()
    return float((codes.float() * scale - w).pow(2).sum() / w.pow(2).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="3,20")
    args = parser.parse_args()
    prefixes = tuple(f"model.layers.{i}." for i in args.layers.split(","))
    model = load_model("builtin:smollm2-135m-instruct").model
    rows = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith(prefixes):
            plain, searched = relative_error(module.weight.data, False), relative_error(module.weight.data, True)
            rows[name] = {"minmax": plain, "mse": searched, "ratio": round(searched / plain, 4)}
            print(json.dumps({name: rows[name]}), flush=True)
    ratios = [r["ratio"] for r in rows.values()]
    print(json.dumps({"layers": len(rows), "mean_ratio": round(sum(ratios) / len(ratios), 4)}))


if __name__ == "__main__":
    main()
