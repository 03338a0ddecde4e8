#!/usr/bin/env python
"""SmolLM2 W4 g64 decode against its bf16 twin at 1 and 2 torch threads, in one process.

    python benchmarks/decode_threads.py [--model-dir DIR] [--rounds 2] [--tokens 32] [--compile]

The decode ratio moves with the thread count, and separate runs on a shared 2-core machine
are too noisy to compare, so both thread counts alternate here: round after round, each model
decodes `--tokens` tokens three times at 1 thread, then at 2 (median of the three). With
`--compile` each round also times both models' one-token forward under torch.compile with a
static KV cache (compressor.decode_speed), compiled afresh for each thread count. The model folder is made as in
benchmarks/cpu_kernels.py when absent.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from cpu_kernels import ensure_model  # noqa: E402  (a sibling script: benchmarks/ is on sys.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()

    import compressor
    from compressor.decode_speed import densified, time_decode
    from compressor.runtime import kernel_summary

    compressed = compressor.load(ensure_model(args.model_dir), dtype=torch.bfloat16)
    dense = densified(compressed)
    prompt = torch.randint(3, compressed.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    rows = []
    for round_index in range(args.rounds):
        for threads, compiled in [(t, c) for c in ([False, True] if args.compile else [False]) for t in (1, 2)]:
            torch.set_num_threads(threads)
            if compiled:
                torch._dynamo.reset()  # inductor's C++ bakes the thread count in: compile again for this one
            timings = time_decode({"w4": compressed, "bf16": dense}, prompt, args.tokens, repeats=3, compile=compiled)
            w4, bf16 = timings["w4"].tokens_per_second, timings["bf16"].tokens_per_second
            rows.append({"round": round_index + 1, "threads": threads, "mode": "compiled" if compiled else "eager",
                         "w4_tokens_per_s": round(w4, 2), "bf16_tokens_per_s": round(bf16, 2), "ratio": round(w4 / bf16, 3)})
            print(json.dumps(rows[-1]), flush=True)
    kernels = sorted({r["kernel"] for r in kernel_summary(compressed).values()})
    print(json.dumps({"kernels": kernels}))


if __name__ == "__main__":
    main()
