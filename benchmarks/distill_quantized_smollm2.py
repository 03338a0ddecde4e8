#!/usr/bin/env python
"""Distillation after 4-bit quantization on SmolLM2-135M-Instruct: `train: scales` (scales and
zero points) against `train: lora` (adapters on the frozen packed layers), through `compress`.

    python benchmarks/distill_quantized_smollm2.py [--steps 12] [--max-minutes 5] [--eval-limit 16]
        [--out benchmarks/out/distill-quantized] [--json out.json]

Three `compress` runs of one recipe (RTN W4 asymmetric, group 64, lm_head kept): quantize only,
quantize + distill `train: scales`, quantize + distill `train: lora`; teacher `base` (the bf16
model), forward KL, batches of 4 × 256 tokens of calibration text (`data:`, seed 1). Held-out
perplexity on the first `--eval-limit` windows of 512 tokens of the evaluation slice (never the
distillation text). The checkpoints are read back: `scales` must keep every packed code, `lora`
every tensor (exit 1 otherwise); the zero points that moved are counted.

Gap closed = (ppl_w4 - ppl_distilled) / (ppl_w4 - ppl_bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

MODEL = "builtin:smollm2-135m-instruct"
ROOT = Path(__file__).resolve().parent.parent
COMPRESS = ROOT / ".venv" / "bin" / "compress"
QUANTIZE = {"quantize": {"method": "rtn", "weights": {"bits": 4, "group_size": 64, "symmetric": False}, "ignore": ["lm_head"]}}
MODES = {
    "scales": {"train": "scales", "lr": 1.0e-4},
    "lora": {"train": "lora", "rank": 16, "lr": 1.0e-3},
}


def recipe_for(mode: str | None, args: argparse.Namespace) -> dict:
    stages: list[dict] = [QUANTIZE]
    if mode is not None:
        stages.append({"distill": {
            "loss": {"kind": "kl"}, "steps": args.steps, "max_minutes": args.max_minutes, "schedule": "cosine",
            "warmup_steps": 1, "batch_size": 4, "checkpoint_every": None,
            "data": {"dataset": "builtin:abstracts", "samples": 256, "seq_len": 256, "seed": 1}, **MODES[mode],
        }})
    return {"name": f"w4-{mode or 'only'}", "calibration": {"samples": 16, "seq_len": 512},
            "stages": stages, "evaluate": {"tasks": ["perplexity"], "limit": args.eval_limit}}


def run(name: str, recipe: dict, out: Path) -> tuple[dict, float]:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    target = out / name
    command = [str(COMPRESS), MODEL, "--recipe", str(path), "--output", str(target), "--overwrite", "--quiet"]
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - started
    return json.loads((target / "compression.json").read_text()), seconds


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        found.update(load_file(str(file)))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "distill-quantized")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--max-minutes", type=float, default=5.0)
    parser.add_argument("--eval-limit", type=int, default=16)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    quantized, seconds = run("w4-only", recipe_for(None, args), args.out)
    bf16, w4 = quantized["perplexity"]["base"], quantized["perplexity"]["compressed"]
    report["bf16"], report["w4"], report["w4_seconds"] = bf16, w4, round(seconds, 1)
    before = tensors(args.out / "w4-only")
    ok = True
    for mode in args.modes:
        record, seconds = run(f"w4-{mode}", recipe_for(mode, args), args.out)
        after = tensors(args.out / f"w4-{mode}")
        ppl = record["perplexity"]["compressed"]
        training = record["training"]["stage-2-distill"]
        packed_kept = all(torch.equal(before[k], after[k]) for k in before if k.endswith("weight_packed"))
        all_kept = set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)
        zeros = [k for k in before if k.endswith("weight_zero_point")]
        moved = sum(int((before[k] != after[k]).any()) for k in zeros)
        ok &= packed_kept and (all_kept if mode == "lora" else True)
        report[mode] = {
            "perplexity": ppl, "gap_closed": (w4 - ppl) / (w4 - bf16), "run_seconds": round(seconds, 1),
            "distill_seconds": record["stages"][1]["seconds"], "steps": training["steps"],
            "stopped_by_time": training["stopped_by_time"], "first_loss": training["first_loss"],
            "last_loss": training["last_loss"], "packed_codes_kept": packed_kept, "every_tensor_kept": all_kept,
            "zero_point_tensors_changed": f"{moved}/{len(zeros)}",
            "adapter_bytes": record["sizes"]["lowrank_bytes"].get("lowrank_adapter", 0),
        }
        print(json.dumps({mode: report[mode]}, indent=1), flush=True)
    print(f"bf16 {bf16:.3f}  W4 {w4:.3f}  " + "  ".join(f"{m} {report[m]['perplexity']:.3f}" for m in args.modes))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
