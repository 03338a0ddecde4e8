#!/usr/bin/env python
"""Distillation after SparseGPT 2:4 on SmolLM2-135M-Instruct: how much of the held-out perplexity
gap to bf16 a short `distill` stage closes, through the `compress` command users run.

    python benchmarks/distill_smollm2.py [--recipe recipes/sparse24-sparsegpt-distill.yaml]
        [--out benchmarks/out/distill-smollm2] [--pruned-from DIR] [--json out.json]

1. Prune only: the recipe with its distill stage removed (same calibration, same prune block,
   `storage: dense`) through `compress`, for the pruned model's held-out perplexity.
2. The whole recipe through `compress`: bf16 and final held-out perplexity (the evaluation
   slice in windows of calibration.seq_len, never the distillation text), the distill stage's
   wall time and steps, the loss curve PNG.
   With --pruned-from DIR (an earlier prune-only output of this recipe, e.g. step 1's), step 1 is
   skipped and step 2 runs only the recipe's distill stage on DIR, with `teacher: base` replaced by
   the original model: the same student, teacher and training, without pruning twice (for a machine
   too busy to run SparseGPT again).
3. The saved checkpoint is read back: every layer the prune-only run left 2:4 must still be
   2:4, with every pruned zero still zero (exit 1 otherwise).

Gap closed = (ppl_pruned - ppl_distilled) / (ppl_pruned - ppl_bf16).
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

from compressor.algorithms.masks import is_nm_sparse, parse_nm  # noqa: E402
from compressor.sparse_format import dense_tensor, sparse_prefixes  # noqa: E402

MODEL = "builtin:smollm2-135m-instruct"
ROOT = Path(__file__).resolve().parent.parent
COMPRESS = ROOT / ".venv" / "bin" / "compress"


def prune_only_recipe(recipe: dict) -> dict:
    """The recipe up to (not including) its distill stage, pruned weights saved dense."""
    stages = []
    for stage in recipe["stages"]:
        if "distill" in stage:
            break
        if "prune" in stage:
            stage = {"prune": {**stage["prune"], "storage": "dense"}}
        stages.append(stage)
    return {**recipe, "name": recipe["name"] + "-prune-only", "stages": stages}


def apply_overrides(recipe: dict, args: argparse.Namespace) -> bool:
    """Shrink the run for a busy machine; the changes are reported with the results."""
    changed = False
    if args.samples is not None:
        recipe.setdefault("calibration", {})["samples"] = args.samples
        changed = True
    if args.eval_limit is not None:
        recipe["evaluate"] = {"tasks": ["perplexity"], "limit": args.eval_limit}
        changed = True
    for stage in recipe["stages"]:
        if "distill" in stage:
            for key, value in (("steps", args.steps), ("max_minutes", args.max_minutes)):
                if value is not None:
                    stage["distill"][key] = value
                    changed = True
    return changed


def _shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def distill_only_recipe(recipe: dict) -> dict:
    """The recipe's distill stage alone, taught by the original model instead of `base`."""
    stages = []
    for stage in recipe["stages"]:
        if "distill" in stage:
            block = stage["distill"]
            stages.append({"distill": {**block, "teacher": MODEL if block.get("teacher", "base") == "base" else block["teacher"]}})
    return {**recipe, "name": recipe["name"] + "-distill-only", "stages": stages}


def run_compress(model: str, recipe: Path, out: Path) -> float:
    command = [str(COMPRESS), model, "--recipe", str(recipe), "--output", str(out), "--overwrite", "--quiet"]
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def dense_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every `<layer>.weight`, sparse-bitmask layers expanded to dense."""
    tensors = read_weights(folder)
    weights = {k[: -len(".weight")]: v for k, v in tensors.items() if k.endswith(".weight") and v.dim() == 2}
    for prefix in sparse_prefixes(tensors):
        weights[prefix] = dense_tensor(tensors, prefix)
    return weights


def check_masks(pruned_dir: Path, distilled_dir: Path, pattern: str) -> dict:
    """Layers 2:4 after pruning must be 2:4 after distillation, their zeros a superset of the pruned zeros."""
    nm = parse_nm(pattern)
    before, after = dense_weights(pruned_dir), dense_weights(distilled_dir)
    pruned = [name for name, w in before.items() if is_nm_sparse(w, nm) and (w == 0).float().mean() >= nm.sparsity - 1e-6]
    broken = [name for name in pruned if not is_nm_sparse(after[name], nm)]
    revived = [name for name in pruned if bool((after[name][before[name] == 0] != 0).any())]
    changed = [name for name in pruned if not torch.equal(after[name], before[name])]
    return {"pruned_layers": len(pruned), "still_nm": len(pruned) - len(broken), "zeros_kept": len(pruned) - len(revived),
            "layers_trained": len(changed), "broken": broken, "revived": revived}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "sparse24-sparsegpt-distill.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "distill-smollm2")
    parser.add_argument("--pruned-from", type=Path, help="an earlier prune-only output of this recipe")
    parser.add_argument("--prune-once", action="store_true",
                        help="run step 1, then the distill stage on its output (as --pruned-from)")
    parser.add_argument("--samples", type=int, help="override calibration.samples (a busy machine)")
    parser.add_argument("--eval-limit", type=int, help="held-out perplexity on the first N windows only")
    parser.add_argument("--steps", type=int, help="override the distill stage's steps")
    parser.add_argument("--max-minutes", type=float, help="override the distill stage's max_minutes")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    recipe = yaml.safe_load(args.recipe.read_text())
    overridden = apply_overrides(recipe, args)
    args.out.mkdir(parents=True, exist_ok=True)
    if overridden:
        args.recipe = args.out / "recipe.yaml"
        args.recipe.write_text(yaml.safe_dump(recipe, sort_keys=False))
    pattern = next(s["prune"]["sparsity"] for s in recipe["stages"] if "prune" in s)

    pruned_dir = args.pruned_from or args.out / "pruned"
    prune_seconds = None
    if args.pruned_from is None:
        prune_recipe = args.out / "prune-only.yaml"
        prune_recipe.write_text(yaml.safe_dump(prune_only_recipe(recipe), sort_keys=False))
        prune_seconds = run_compress(MODEL, prune_recipe, pruned_dir)
    pruned_info = json.loads((pruned_dir / "compression.json").read_text())
    if args.prune_once:
        args.pruned_from = pruned_dir

    distilled_dir = args.out / "distilled"
    run_recipe, start_model = args.recipe, MODEL
    if args.pruned_from is not None:
        run_recipe, start_model = args.out / "distill-only.yaml", str(args.pruned_from)
        run_recipe.write_text(yaml.safe_dump(distill_only_recipe(recipe), sort_keys=False))
    distill_index = next(i for i, s in enumerate(yaml.safe_load(run_recipe.read_text())["stages"]) if "distill" in s)
    load_before = os.getloadavg()
    total_seconds = run_compress(start_model, run_recipe, distilled_dir)
    load_after = os.getloadavg()
    info = json.loads((distilled_dir / "compression.json").read_text())

    ppl_bf16 = pruned_info["perplexity"]["base"] if args.pruned_from is not None else info["perplexity"]["base"]
    ppl_pruned = pruned_info["perplexity"]["compressed"]
    ppl_distilled = info["perplexity"]["compressed"]
    gap_closed = (ppl_pruned - ppl_distilled) / (ppl_pruned - ppl_bf16)
    label = f"stage-{distill_index + 1}-distill"
    stage = info["stages"][distill_index]
    masks = check_masks(pruned_dir, distilled_dir, pattern)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} CPU cores (shared with other agents), torch threads {torch.get_num_threads()}",
        "load_average_1_5_15": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in load_after]},
        "command": f"{_shown(COMPRESS)} {_shown(Path(start_model)) if args.pruned_from else MODEL} --recipe {_shown(run_recipe)} --output {_shown(distilled_dir)}",
        "mode": "distill stage on the prune-only output" if args.pruned_from else "whole recipe",
        "benchmark_command": " ".join([Path(sys.executable).name, *sys.argv]),
        "recipe_run": yaml.safe_load(run_recipe.read_text()),
        "eval_tokens": info["perplexity"]["tokens"],
        "ppl_bf16": round(ppl_bf16, 3),
        "ppl_pruned": round(ppl_pruned, 3),
        "ppl_distilled": round(ppl_distilled, 3),
        "gap_closed": round(gap_closed, 4),
        "target_met": gap_closed >= 0.25,
        "distill_seconds": stage["seconds"],
        "distill_within_15_min": stage["seconds"] <= 15 * 60,
        "training": info["training"][label],
        "whole_run_seconds": round(total_seconds, 1),
        "prune_only_run_seconds": round(prune_seconds, 1) if prune_seconds is not None else None,
        "bf16_ppl_in_prune_only_run": round(pruned_info["perplexity"]["base"], 3),
        "start_ppl_in_distill_run": round(info["perplexity"]["base"], 3),
        "loss_curve": str(distilled_dir / f"{label}-loss.png"),
        "masks": masks,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if masks["broken"] or masks["revived"] or masks["pruned_layers"] == 0:
        print(f"FAILED: the {pattern} pattern did not survive distillation", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
