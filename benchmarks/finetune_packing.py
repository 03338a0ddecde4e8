#!/usr/bin/env python
"""`compress finetune --packing` on SmolLM2-135M-Instruct: padding and tokens per step, then time.

    python benchmarks/finetune_packing.py [--data titles|varied] [--steps 8] [--max-length 512] [--batch-size 4]
                                          [--no-time] [--json out.json]
    python benchmarks/finetune_packing.py --sdpa [--json out.json]
    python benchmarks/finetune_packing.py --model-step [--json out.json]

Data (240 chat records from the calibration slice's abstracts, "give a title", loss on the answer
only; tokenized by `compressor.finetune_data.load_examples`):
  titles: `lowrank_smollm2.py qlora-data`, abstracts cut to 400 characters: lengths 111-197 tokens;
  varied: record i's abstract cut to 40 + (i × 337 mod 1400) characters: lengths from ~50 to ~400
          tokens, the spread of a real chat set.

padding: one epoch of the training loader as `compress finetune` builds it (batches of
--batch-size, shuffled from seed 0), unpacked (padded to the longest example of each batch) and
packed (--max-length sequences, best-fit decreasing): micro-batches per epoch, real tokens and
answer tokens per micro-batch, and the padding fraction (pad slots / all slots the forward computes).

time: `compress finetune --qlora` (its Python entry, one subprocess each, unpacked then packed) for
--steps steps with gradient checkpointing; step ends are timed from the per-step log line, the
first 2 steps are left out; seconds per step, real tokens per second (tokens per step from the
padding part's epoch mean) and the estimated seconds per epoch.

--sdpa: what the packed mask costs the attention kernel itself: torch's scaled_dot_product_attention
forward + backward at SmolLM2's attention shape (4 rows × 9 heads × 512 tokens × 64), best of 3,
causal through `is_causal`, with a block-diagonal causal mask (3 packed examples) and with a
causal + padding mask (the last 112 positions padded), fp32 and bf16.

--model-step: the same three attention inputs through the whole model: SmolLM2 in fp32 with
non-reentrant activation checkpointing, forward + backward of 4 × 512 random tokens, twice each
(no LoRA, no NF4), to see whether the packed path costs anything beyond the kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

MODEL = "builtin:smollm2-135m-instruct"
SKIP_STEPS = 2


def make_data(folder: Path, kind: str) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import lowrank_smollm2

    if kind == "titles":
        lowrank_smollm2.qlora_data(argparse.Namespace(out=str(folder), max_chars=400))
        return folder / "train.jsonl"
    from compressor.calibration.corpus import calibration_slice_path

    lines = []
    for i, line in enumerate(calibration_slice_path().read_text().splitlines()):
        record = json.loads(line)
        prompt = lowrank_smollm2.PROMPT.format(abstract=record["abstract"][: 40 + (i * 337) % 1400])
        lines.append(json.dumps({"messages": [{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": record["title"]}]}))
    (folder / "varied.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "varied.jsonl"


def _loader_stats(loader) -> dict:
    real, answer, slots, batches = 0, 0, 0, 0
    for batch in loader:
        labels = batch["labels"]
        width = labels.shape[0] * labels.shape[1]
        if "attention_mask" in batch:
            real += int(batch["attention_mask"].sum())
        else:  # packed: padding is the tail after the last real token, labelled IGNORE and positions restarted
            real += sum(len(row) for row in batch["_lengths"])
        answer += int((labels[:, 1:] != -100).sum())
        slots += width
        batches += 1
    return {"micro_batches": batches, "real_tokens_per_micro_batch": real / batches,
            "answer_tokens_per_micro_batch": answer / batches, "slots_per_micro_batch": slots / batches,
            "padding_fraction": 1 - real / slots}


def padding(train: Path, max_length: int, batch_size: int) -> dict:
    from compressor.finetune_data import load_examples
    from compressor.finetune_loop import make_loader
    from compressor.finetune_packing import collate_packed, pack_examples
    from compressor.model_io import load_tokenizer, prepare_source

    _source, path, _folder = prepare_source(MODEL)
    tokenizer = load_tokenizer(path, MODEL, False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = load_examples(str(train), tokenizer, max_length=max_length)
    lengths = [len(e.input_ids) for e in examples]
    unpacked = _loader_stats(make_loader(examples, batch_size, pad_id, 0))
    rows, stats = pack_examples(examples, max_length)
    loader = make_loader(rows, batch_size, pad_id, 0, packed=True)
    # the real lengths of each packed batch's rows, beside what collate_packed returns
    loader.collate_fn = lambda batch: collate_packed(batch, pad_id) | {"_lengths": [r.input_ids for r in batch]}
    packed = _loader_stats(loader)
    return {"examples": len(examples), "example_tokens": {"min": min(lengths), "median": statistics.median(lengths),
                                                          "max": max(lengths), "total": sum(lengths)},
            "sequences": stats.sequences, "fill": stats.fill, "unpacked": unpacked, "packed": packed}


def worker(args) -> dict:
    from compressor.finetune import FinetuneOptions, run_finetune

    stamps: list[float] = []

    def echo(line: str) -> None:
        if line.startswith("step ") and "/" in line.split(":")[0]:
            stamps.append(time.perf_counter())

    options = FinetuneOptions(model=MODEL, dataset=args.train, output=Path(args.out), qlora=True, steps=args.steps,
                              batch_size=args.batch_size, max_length=args.max_length, warmup_steps=0, log_every=1,
                              overwrite=True, packing=args.packing)
    summary = run_finetune(options, echo=echo)
    steps = [b - a for a, b in zip(stamps, stamps[1:])][SKIP_STEPS - 1:]
    return {"seconds_per_step": statistics.median(steps), "step_seconds": steps, "losses": summary.losses}


def sdpa_cost() -> dict:
    import torch
    import torch.nn.functional as F

    rows, heads, length, width = 4, 9, 512, 64
    segments = torch.repeat_interleave(torch.arange(3), torch.tensor([170, 170, 172]))
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    padded = causal.clone()
    padded[:, 400:] = False
    masks = {"is_causal": None, "block_diagonal": (segments[:, None] == segments[None, :]) & causal, "padding": padded}
    result = {}
    for dtype in (torch.float32, torch.bfloat16):
        for name, mask in masks.items():
            q, k, v = (torch.randn(rows, heads, length, width, dtype=dtype, requires_grad=True) for _ in range(3))
            kwargs = {"is_causal": True} if mask is None else {"attn_mask": mask.expand(rows, 1, length, length)}
            best = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                F.scaled_dot_product_attention(q, k, v, **kwargs).sum().backward()
                best = min(best, time.perf_counter() - started)
            result[f"{name}_{str(dtype).split('.')[-1]}_ms"] = round(best * 1000, 1)
    return result


def model_step_cost() -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from compressor.model_io import prepare_source

    _source, path, _folder = prepare_source(MODEL)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    rows, length = 4, 512
    ids = torch.randint(0, 40000, (rows, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[:, 400:] = 0
    positions = torch.cat([torch.arange(170), torch.arange(170), torch.arange(172)]).expand(rows, -1).contiguous()
    inputs = {"is_causal": {}, "padding": {"attention_mask": mask}, "packed": {"position_ids": positions}}
    seconds: dict[str, list[float]] = {name: [] for name in inputs}
    for _ in range(2):
        for name, extra in inputs.items():
            started = time.perf_counter()
            model(input_ids=ids, use_cache=False, **extra).logits.float().mean().backward()
            seconds[name].append(round(time.perf_counter() - started, 2))
            model.zero_grad(set_to_none=True)
    return seconds


def _environment() -> dict:
    import peft
    import torch
    import transformers

    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=["titles", "varied"], default="titles")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--no-time", action="store_true", help="padding statistics only")
    parser.add_argument("--sdpa", action="store_true", help="only the attention kernel's cost per mask kind")
    parser.add_argument("--model-step", action="store_true", help="only a whole-model step per mask kind")
    parser.add_argument("--json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--packing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--train", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.sdpa or args.model_step:
        part = {"sdpa": sdpa_cost()} if args.sdpa else {"model_step_seconds": model_step_cost()}
        result = {"environment": _environment(), **part, "load_average": os.getloadavg()}
        print(json.dumps(result, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return
    with tempfile.TemporaryDirectory() as tmp:
        train = make_data(Path(tmp), args.data)
        result = {"environment": _environment(), "load_average_before": os.getloadavg(), "settings": {"data": args.data, "max_length": args.max_length,
                                                               "batch_size": args.batch_size, "steps": args.steps},
                  "padding": padding(train, args.max_length, args.batch_size)}
        if not args.no_time:
            for name, flags in (("unpacked", []), ("packed", ["--packing"])):
                command = [sys.executable, __file__, "--worker", "--train", str(train), "--out", str(Path(tmp) / name),
                           "--steps", str(args.steps), "--max-length", str(args.max_length),
                           "--batch-size", str(args.batch_size), *flags]
                run = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
                stats = result["padding"][name]
                run["real_tokens_per_second"] = stats["real_tokens_per_micro_batch"] / run["seconds_per_step"]
                run["seconds_per_epoch"] = stats["micro_batches"] * run["seconds_per_step"]
                result[f"time_{name}"] = run
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
