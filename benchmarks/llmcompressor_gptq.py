#!/usr/bin/env python
"""llm-compressor side of the side-by-side GPTQ / SparseGPT benchmark.

Run with the separate venv made by benchmarks/setup_llmcompressor_venv.sh:

    benchmarks/.venv-llmcompressor/bin/python benchmarks/llmcompressor_gptq.py \
        --model MODEL_DIR --tokens CALIB.safetensors --out OUT_DIR \
        --bits 4 --group-size 64 [--sparsegpt-24]

In one process it
  1. loads MODEL_DIR in bfloat16 on CPU,
  2. times one no-grad forward pass of the bf16 model over all N calibration
     windows, one window per call (the reference time),
  3. times llm-compressor's ``oneshot`` with a GPTQModifier (W{bits}A16,
     symmetric int, group size --group-size, lm_head ignored, actorder left at
     llm-compressor's default) or, with --sparsegpt-24, a SparseGPTModifier
     (sparsity 0.5, mask 2:4, no quantization), calibrated on exactly the
     [N, L] ``input_ids`` windows of CALIB.safetensors,
  4. records peak RSS right after oneshot and saves the model with
     ``save_compressed=True`` to OUT_DIR,
and prints a final line ``RESULT {json}``.

Helper to build a development calibration file from a JSONL corpus:

    benchmarks/.venv-llmcompressor/bin/python benchmarks/llmcompressor_gptq.py \
        --make-tokens --model /tmp/smol --corpus /work/shared/corpus/abstracts.jsonl \
        --tokens /tmp/calib_128x512.safetensors --num-samples 128 --seq-len 512
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

# The Hugging Face Hub is not reachable; never try it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def log(msg: str) -> None:
    print(f"[llmcompressor_gptq] {msg}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_tokens(args: argparse.Namespace) -> None:
    """Tokenize title + "\\n\\n" + abstract docs joined by EOS, cut [N, L] windows."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    if tok.eos_token_id is None:
        raise SystemExit("tokenizer has no EOS token")
    need = args.num_samples * args.seq_len
    ids: list[int] = []
    with open(args.corpus, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            doc = json.loads(line)
            text = f"{doc.get('title', '')}\n\n{doc.get('abstract', '')}"
            if ids:
                ids.append(tok.eos_token_id)
            ids.extend(tok(text, add_special_tokens=False)["input_ids"])
            if len(ids) >= need:
                break
    if len(ids) < need:
        raise SystemExit(
            f"corpus too small: {len(ids)} tokens < {args.num_samples}x{args.seq_len}"
        )
    t = torch.tensor(ids[:need], dtype=torch.int64).view(args.num_samples, args.seq_len)
    Path(args.tokens).parent.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": t.contiguous()}, args.tokens)
    log(f"wrote {args.tokens}: input_ids {tuple(t.shape)} from {len(ids)} tokens")


def time_forward(model, input_ids: torch.Tensor) -> float:
    """One bf16 forward over all windows, one [1, L] window per call."""
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(input_ids.shape[0]):
            model(input_ids=input_ids[i : i + 1], use_cache=False)
    return time.perf_counter() - t0


def build_recipe(args: argparse.Namespace):
    if args.sparsegpt_24:
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        return (
            SparseGPTModifier(
                sparsity=0.5,
                mask_structure="2:4",
                targets=["Linear"],
                ignore=["re:.*lm_head"],
            ),
            "sparsegpt_2:4",
        )

    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationScheme,
        QuantizationStrategy,
        QuantizationType,
    )
    from llmcompressor.modifiers.gptq import GPTQModifier

    # Same as the "W4A16" preset (symmetric int, group strategy, static), only
    # with the requested bit width and group size. actorder is not set, so
    # GPTQModifier applies its own default.
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(
            num_bits=args.bits,
            type=QuantizationType.INT,
            strategy=QuantizationStrategy.GROUP,
            group_size=args.group_size,
            symmetric=True,
            dynamic=False,
        ),
    )
    return (
        GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"]),
        f"W{args.bits}A16_g{args.group_size}",
    )


def run(args: argparse.Namespace) -> None:
    import compressed_tensors
    import llmcompressor
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    input_ids = load_file(args.tokens)["input_ids"].to(torch.int64)
    if input_ids.ndim != 2:
        raise SystemExit(f"input_ids must be [N, L], got {tuple(input_ids.shape)}")
    n, seq_len = input_ids.shape
    log(
        f"llmcompressor {llmcompressor.__version__}, compressed-tensors "
        f"{compressed_tensors.__version__}, transformers {transformers.__version__}, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}; "
        f"calibration {n}x{seq_len}"
    )

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.bfloat16, device_map=None
    )
    model.to("cpu")

    forward_s = time_forward(model, input_ids)
    log(f"bf16 forward over {n} samples: {forward_s:.2f} s")

    ds = Dataset.from_dict(
        {
            "input_ids": input_ids.tolist(),
            "attention_mask": torch.ones_like(input_ids).tolist(),
        }
    )
    recipe, scheme_name = build_recipe(args)

    t0 = time.perf_counter()
    model = oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=ds,
        recipe=recipe,
        num_calibration_samples=n,
        max_seq_length=seq_len,
        shuffle_calibration_samples=False,
    )
    oneshot_s = time.perf_counter() - t0
    rss = peak_rss_mb()
    log(f"oneshot ({scheme_name}): {oneshot_s:.2f} s, peak RSS {rss:.0f} MB")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    save_s = time.perf_counter() - t0
    out_bytes = sum(p.stat().st_size for p in out.rglob("*.safetensors"))

    result = {
        "llmcompressor_version": llmcompressor.__version__,
        "compressed_tensors_version": compressed_tensors.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "num_samples": n,
        "seq_len": seq_len,
        "threads": torch.get_num_threads(),
        "forward_s": round(forward_s, 3),
        "oneshot_s": round(oneshot_s, 3),
        "ratio": round(oneshot_s / forward_s, 3),
        "peak_rss_mb": round(rss, 1),
        "save_s": round(save_s, 3),
        "out_dir": str(out.resolve()),
        "out_bytes": out_bytes,
        "scheme": scheme_name,
    }
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local bf16 HF checkpoint dir")
    p.add_argument("--tokens", required=True, help="safetensors file with input_ids [N, L]")
    p.add_argument("--out", help="output dir for the compressed model")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument(
        "--sparsegpt-24",
        action="store_true",
        help="SparseGPT 50%% 2:4 pruning instead of GPTQ (no quantization)",
    )
    p.add_argument("--make-tokens", action="store_true", help="only build --tokens from --corpus")
    p.add_argument("--corpus", default="/work/shared/corpus/abstracts.jsonl")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    args = p.parse_args()

    if args.make_tokens:
        make_tokens(args)
        return
    if not args.out:
        p.error("--out is required")
    run(args)


if __name__ == "__main__":
    main()
