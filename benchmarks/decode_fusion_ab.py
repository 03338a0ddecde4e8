#!/usr/bin/env python
"""SmolLM2 W4 g64 decode with and without the fused gated-MLP call, alternating in one process.

    python benchmarks/decode_fusion_ab.py [--model-dir DIR] [--alternations 15] [--tokens 32]

Two copies of the compressed model are loaded; one has the fused MLP call removed
(compressor.kernels.gated_mlp.remove_fused_mlps), so its MLPs run transformers' forward over
our per-layer kernel. Each alternation decodes `--tokens` tokens with each copy, at 1 thread and
then at 2; the difference is small next to this machine's noise, so the minimum and the median
over all alternations are printed per token. The model folder is made as in
benchmarks/cpu_kernels.py when absent.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from cpu_kernels import ensure_model  # noqa: E402  (a sibling script: benchmarks/ is on sys.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--alternations", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()

    import compressor
    from compressor.decode_speed import _decode_once
    from compressor.kernels.gated_mlp import remove_fused_mlps

    folder = ensure_model(args.model_dir)
    models = {"fused MLP": compressor.load(folder, dtype=torch.bfloat16), "per-layer": compressor.load(folder, dtype=torch.bfloat16)}
    remove_fused_mlps(models["per-layer"])
    prompt = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for model in models.values():
            _decode_once(model, prompt, 8)
        token_ms: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.alternations):
            for name, model in models.items():
                token_ms[name].append(_decode_once(model, prompt, args.tokens) * 1e3 / args.tokens)
        for name, values in token_ms.items():
            print(json.dumps({"threads": threads, "model": name, "min_ms": round(min(values), 2),
                              "median_ms": round(statistics.median(values), 2)}), flush=True)


if __name__ == "__main__":
    main()
