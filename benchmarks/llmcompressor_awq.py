#!/usr/bin/env python
"""llm-compressor side of the AWQ benchmark: AWQ W{bits}A16 group --group-size on CPU.

Run with the separate venv made by benchmarks/setup_llmcompressor_venv.sh:

    benchmarks/.venv-llmcompressor/bin/python benchmarks/llmcompressor_awq.py \
        --model MODEL_DIR --tokens CALIB.safetensors --out OUT_DIR --bits 4 --group-size 64

Prints a final line ``RESULT {json}``: on success the oneshot time and output folder; on
failure ``{"ok": false, "error": "<exception type>: <message>"}`` (llm-compressor 0.14's AWQ
is expected to refuse a machine without an accelerator).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402


def run(args: argparse.Namespace) -> dict:
    import llmcompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, QuantizationStrategy, QuantizationType
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    input_ids = load_file(args.tokens)["input_ids"].to(torch.int64)
    n, seq_len = input_ids.shape
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=args.bits, type=QuantizationType.INT, strategy=QuantizationStrategy.GROUP,
                                 group_size=args.group_size, symmetric=True, dynamic=False),
    )
    recipe = AWQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    ds = Dataset.from_dict({"input_ids": input_ids.tolist(), "attention_mask": torch.ones_like(input_ids).tolist()})
    started = time.perf_counter()
    model = oneshot(model=model, tokenizer=tokenizer, dataset=ds, recipe=recipe, num_calibration_samples=n,
                    max_seq_length=seq_len, shuffle_calibration_samples=False)
    seconds = time.perf_counter() - started
    out = Path(args.out)
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    return {"ok": True, "llmcompressor_version": llmcompressor.__version__, "oneshot_s": round(seconds, 2),
            "out_dir": str(out.resolve())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    args = parser.parse_args()
    try:
        result = run(args)
    except Exception as err:  # the outcome is the measurement: report it, whatever it is
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(err).__name__}: {err}"}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
