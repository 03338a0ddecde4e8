#!/usr/bin/env python
"""Low-rank benchmarks on SmolLM2-135M-Instruct.

    python benchmarks/lowrank_smollm2.py eora [--rank 32] [--json out.json]
    python benchmarks/lowrank_smollm2.py qlora-data --out benchmarks/out/titles    # make the instruction set

eora: in one process, build the `w4a16-g64-gptq` recipe's calibration windows, measure the bf16
held-out perplexity, run its GPTQ quantize stage, measure, run `lowrank: {method: eora, rank}` on
the same windows, measure; save the result (compressed-tensors + lowrank_adapter/) and report
the share of the perplexity gap closed and the bytes the adapter adds.

qlora-data: an instruction set from the built-in corpus ("Give a title for this abstract" →
title) as chat JSONL, split into train (calibration slice) and held-out (evaluation slice)
files, for `compress finetune --qlora` (command and results in RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

MODEL = "builtin:smollm2-135m-instruct"
PROMPT = "Give a title for this abstract.\n\n{abstract}"


def _stage(kind: str, body: str, recipe_text: str):
    from compressor.recipe import parse_recipe_text

    return parse_recipe_text(recipe_text.replace("STAGES", f"  - {kind}: {body}")).stages[0].config


def eora(args) -> dict:
    from compressor.adapters import write_lowrank_artifacts
    from compressor.cache import cache_root
    from compressor.calibration.batches import build_calibration
    from compressor.evaluation.perplexity import evaluation_windows, perplexity_on
    from compressor.formats import write_quantization_config
    from compressor.model_io import load_model, weights_bytes
    from compressor.recipe import load_recipe
    from compressor.stages.base import StageContext
    from compressor.stages.lowrank import LowRankStage
    from compressor.stages.quantize import QuantizeStage

    recipe = load_recipe("w4a16-g64-gptq")
    loaded = load_model(MODEL)
    model, tokenizer = loaded.model, loaded.tokenizer
    tokens = build_calibration(recipe.calibration, tokenizer, cache_root() / "calibration")
    windows = evaluation_windows(tokenizer, recipe.calibration.seq_len)
    ctx = StageContext(tokenizer=tokenizer, calibration=lambda: tokens, device=torch.device("cpu"), show_progress=False)
    result: dict = {"rank": args.rank, "calibration": list(tokens.shape), "eval_tokens": int(windows[:, 1:].numel())}
    result["ppl_bf16"] = perplexity_on(model, windows).perplexity
    print(f"bf16 perplexity {result['ppl_bf16']:.3f}", flush=True)

    quantize = recipe.stages[0].config
    stage = QuantizeStage()
    started = time.perf_counter()
    stage.run(model, quantize, ctx, stage.plan(model, quantize, lambda *k: {}))
    result["gptq_seconds"] = time.perf_counter() - started
    result["ppl_gptq"] = perplexity_on(model, windows).perplexity
    print(f"gptq perplexity {result['ppl_gptq']:.3f} ({result['gptq_seconds']:.0f} s)", flush=True)

    lowrank = _stage("lowrank", f"{{method: eora, rank: {args.rank}}}", "name: b\nstages:\nSTAGES\n")
    stage2 = LowRankStage()
    started = time.perf_counter()
    stage2.run(model, lowrank, ctx, stage2.plan(model, lowrank, lambda *k: {}))
    result["eora_seconds"] = time.perf_counter() - started
    result["ppl_eora"] = perplexity_on(model, windows).perplexity
    gap = result["ppl_gptq"] - result["ppl_bf16"]
    result["gap_closed"] = (result["ppl_gptq"] - result["ppl_eora"]) / gap
    print(f"eora perplexity {result['ppl_eora']:.3f} ({result['eora_seconds']:.0f} s); gap closed {result['gap_closed']:.1%}", flush=True)
    errors = [r["lowrank"][0] for r in ctx.records.values() if "lowrank" in r]
    result["layers_improved"] = sum(e["weighted_error_after"] < e["weighted_error_before"] for e in errors)
    result["layers"] = len(errors)

    out = Path(args.save) if args.save else Path(tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    write_quantization_config(model, out)
    tokenizer.save_pretrained(str(out))
    sizes = write_lowrank_artifacts(model, out, MODEL)
    result["original_bytes"] = weights_bytes(loaded.folder)
    result["compressed_bytes"] = weights_bytes(out)
    result["adapter_bytes"] = sizes.get("lowrank_adapter", 0)
    result["saved_to"] = str(out)
    print(json.dumps(result, indent=2))
    return result


def qlora_data(args) -> None:
    from compressor.calibration.corpus import calibration_slice_path, evaluation_slice_path

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, path in (("train", calibration_slice_path()), ("heldout", evaluation_slice_path())):
        lines = []
        for line in path.read_text().splitlines():
            record = json.loads(line)
            messages = [
                {"role": "user", "content": PROMPT.format(abstract=record["abstract"][: args.max_chars])},
                {"role": "assistant", "content": record["title"]},
            ]
            lines.append(json.dumps({"messages": messages}))
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        print(f"{out / f'{split}.jsonl'}: {len(lines)} records")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    p = sub.add_parser("eora")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--save", help="folder for the compressed + EoRA checkpoint (default: a temp folder)")
    p.add_argument("--json", help="write the results here")
    q = sub.add_parser("qlora-data")
    q.add_argument("--out", required=True)
    q.add_argument("--max-chars", type=int, default=600, help="abstracts are cut to this many characters")
    args = parser.parse_args()
    if args.part == "eora":
        result = eora(args)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    else:
        qlora_data(args)


if __name__ == "__main__":
    main()
