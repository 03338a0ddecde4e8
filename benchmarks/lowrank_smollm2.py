#!/usr/bin/env python
"""Low-rank benchmarks on SmolLM2-135M-Instruct.

    python benchmarks/lowrank_smollm2.py eora [--rank 32] [--json out.json]
    python benchmarks/lowrank_smollm2.py eora-reload --checkpoint /tmp/eora_out [--variant rank=32 ...]
    python benchmarks/lowrank_smollm2.py qlora-data --out benchmarks/out/titles    # make the instruction set

eora: in one process, build the `w4a16-g64-gptq` recipe's calibration windows, measure the bf16
held-out perplexity, run its GPTQ quantize stage, measure, run `lowrank: {method: eora, rank}` on
the same windows, measure; save the result (compressed-tensors + lowrank_adapter/) and report
the share of the perplexity gap closed and the bytes the adapter adds.

eora-reload: read a checkpoint the `eora` part saved back with `compressor.load` (which applies
its lowrank_adapter/), measure its perplexity, then without the adapter (the GPTQ model alone),
then recompute EoRA on that GPTQ model once per `--variant` (stage keys, e.g. `rank=64` or
`eigen_floor=1e-4`) on the same calibration windows: checks that the saved adapter is the one
evaluated, and compares settings without redoing GPTQ.

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
    from compressor.stages.base import StageContext
    from compressor.stages.quantize import QuantizeStage

    recipe = _recipe(args.samples)
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

    result.update(_run_eora(model, f"rank: {args.rank}", ctx, windows, result["ppl_bf16"], result["ppl_gptq"]))

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


def _recipe(samples: int | None):
    from compressor.recipe import load_recipe

    recipe = load_recipe("w4a16-g64-gptq")
    if samples is not None:
        recipe.calibration.samples = samples
    return recipe


def _run_eora(model, keys: str, ctx, windows, ppl_bf16: float, ppl_gptq: float) -> dict:
    """One `lowrank: {method: eora, <keys>}` stage on `model`, then its held-out perplexity."""
    from compressor.evaluation.perplexity import perplexity_on
    from compressor.stages.lowrank import LowRankStage

    ctx.records.clear()
    config = _stage("lowrank", f"{{method: eora, {keys}}}", "name: b\nstages:\nSTAGES\n")
    stage = LowRankStage()
    started = time.perf_counter()
    stage.run(model, config, ctx, stage.plan(model, config, lambda *k: {}))
    result: dict = {"eora": keys, "eora_seconds": time.perf_counter() - started}
    result["ppl_eora"] = perplexity_on(model, windows).perplexity
    result["gap_closed"] = (ppl_gptq - result["ppl_eora"]) / (ppl_gptq - ppl_bf16)
    errors = [r["lowrank"][-1] for r in ctx.records.values() if "lowrank" in r]
    result["layers_improved"] = sum(e["weighted_error_after"] < e["weighted_error_before"] for e in errors)
    result["layers"] = len(errors)
    result["weighted_error_kept"] = sum(e["weighted_error_after"] for e in errors) / sum(e["weighted_error_before"] for e in errors)
    print(
        f"eora {{{keys}}}: perplexity {result['ppl_eora']:.3f} ({result['eora_seconds']:.0f} s); gap closed"
        f" {result['gap_closed']:.1%}; weighted error kept {result['weighted_error_kept']:.1%}",
        flush=True,
    )
    return result


def eora_reload(args) -> dict:
    """The saved checkpoint through compressor.load, without its adapter, and EoRA variants."""
    import compressor
    from compressor.cache import cache_root
    from compressor.calibration.batches import build_calibration
    from compressor.evaluation.perplexity import evaluation_windows, perplexity_on
    from compressor.kernels.lowrank import compensations, detach_compensation
    from compressor.stages.base import StageContext

    model = compressor.load(args.checkpoint, prepare_kernels=False)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    recipe = _recipe(args.samples)
    tokens = build_calibration(recipe.calibration, tokenizer, cache_root() / "calibration")
    windows = evaluation_windows(tokenizer, recipe.calibration.seq_len)
    result: dict = {"checkpoint": args.checkpoint, "calibration": list(tokens.shape), "ppl_bf16": args.ppl_bf16}
    result["adapter_layers_loaded"] = len(compensations(model))
    result["ppl_loaded"] = perplexity_on(model, windows).perplexity
    print(f"compressor.load (adapter on {result['adapter_layers_loaded']} layers): perplexity {result['ppl_loaded']:.3f}", flush=True)
    for name in list(compensations(model)):
        detach_compensation(model.get_submodule(name))
    result["ppl_gptq"] = perplexity_on(model, windows).perplexity
    print(f"without the adapter: perplexity {result['ppl_gptq']:.3f}", flush=True)
    ctx = StageContext(tokenizer=tokenizer, calibration=lambda: tokens, device=torch.device("cpu"), show_progress=False)
    model.config._name_or_path = args.original
    result["variants"] = []
    for variant in args.variant:
        keys = ", ".join(f"{k}: {v}" for k, v in (item.split("=", 1) for item in variant.split(",")))
        result["variants"].append(_run_eora(model, keys, ctx, windows, args.ppl_bf16, result["ppl_gptq"]))
        for name in list(compensations(model)):
            detach_compensation(model.get_submodule(name))
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
    p.add_argument("--samples", type=int, help="calibration windows of 512 tokens (default: the recipe's 128)")
    r = sub.add_parser("eora-reload")
    r.add_argument("--checkpoint", required=True, help="a folder the eora part saved")
    r.add_argument("--original", default=MODEL, help="where the uncompressed weights are")
    r.add_argument("--ppl-bf16", type=float, default=43.112, help="the bf16 perplexity the gap is measured to")
    r.add_argument("--variant", action="append", default=[], help="EoRA keys, e.g. rank=32,eigen_floor=1e-4 (repeatable)")
    r.add_argument("--samples", type=int)
    r.add_argument("--json")
    q = sub.add_parser("qlora-data")
    q.add_argument("--out", required=True)
    q.add_argument("--max-chars", type=int, default=600, help="abstracts are cut to this many characters")
    args = parser.parse_args()
    if args.part in ("eora", "eora-reload"):
        result = eora(args) if args.part == "eora" else eora_reload(args)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    else:
        qlora_data(args)


if __name__ == "__main__":
    main()
