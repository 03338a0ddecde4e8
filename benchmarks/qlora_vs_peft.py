#!/usr/bin/env python
"""`compress finetune --qlora` against the plain peft + bitsandbytes + TRL QLoRA recipe, on SmolLM2-135M-Instruct.

    python benchmarks/qlora_vs_peft.py compare [--steps 10] [--rounds 1] [--heldout 16] [--json out.json]
    python benchmarks/qlora_vs_peft.py checkpoint [--steps 6] [--interrupt-after 4] [--json out.json]

compare: the titles instruction set of `lowrank_smollm2.py qlora-data` (abstracts cut to 400
characters, so every example fits in 200 tokens), then, alternating `--rounds` times, one
subprocess of each trainer with the same data, seed and settings: NF4 + double quantization,
bf16 compute, LoRA r 16 alpha 32 dropout 0.05 on all linear layers, AdamW lr 2e-4, batch 4,
max length 200, warm-up 3 then cosine, clipping at 0.3, non-reentrant gradient checkpointing.
  ours:  `compressor.finetune.run_finetune` (what `compress finetune --qlora` runs);
  rival: BitsAndBytesConfig → AutoModelForCausalLM → prepare_model_for_kbit_training →
         get_peft_model(LoraConfig) → TRL's SFTTrainer on prompt/completion records (loss on the
         completion only), as peft's and TRL's docs describe the recipe.
Per run: seconds per optimizer step (median after the first 3), the child's peak RSS
(`os.wait4`), the answer-token loss on the same held-out examples before and after (one
evaluator for both: `compressor.finetune_loop.mean_loss`, token-weighted), trainable parameters
(counted in the saved adapter), and whether the rival's tokenized training set equals ours.

checkpoint: for `--optim adamw_torch` and `adamw_8bit`, `compress finetune --qlora --save-every 2`
(CLI subprocesses) uninterrupted, then the same run stopped with SIGTERM right after the
checkpoint of step `--interrupt-after` (the bytes of that checkpoint's optimizer state are
measured there), then `--resume`d; the two adapters and training curves are compared bit for bit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

MODEL = "builtin:smollm2-135m-instruct"
SKIP_STEPS = 3  # warm-up steps (lazy allocations, first-call dispatch) left out of the median
SETTINGS = {"r": 16, "alpha": 32, "dropout": 0.05, "lr": 2e-4, "batch_size": 4, "max_length": 200,
            "warmup_steps": 3, "max_grad_norm": 0.3, "seed": 0}


# --- data ------------------------------------------------------------------------------------------

def make_data(folder: Path, heldout: int) -> tuple[Path, Path]:
    """train.jsonl (240 records) and the first `heldout` held-out records, as lowrank_smollm2 makes them."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import lowrank_smollm2

    lowrank_smollm2.qlora_data(argparse.Namespace(out=str(folder), max_chars=400))
    lines = (folder / "heldout.jsonl").read_text().splitlines()[:heldout]
    small = folder / f"heldout{heldout}.jsonl"
    small.write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl", small


def _tokenizer_and_examples(train: Path, heldout: Path):
    from compressor.finetune_data import load_examples
    from compressor.model_io import load_tokenizer, prepare_source

    _source, path, _folder = prepare_source(MODEL)
    tokenizer = load_tokenizer(path, MODEL, False)
    length = SETTINGS["max_length"]
    return path, tokenizer, load_examples(str(train), tokenizer, max_length=length), load_examples(str(heldout), tokenizer, max_length=length)


def _adapter_parameters(folder: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        return sum(_numel(handle.get_slice(name).get_shape()) for name in handle.keys())


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def memory_mib() -> dict:
    """This process's resident memory now and its high-water mark so far (Linux /proc), MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def _intervals(stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip(stamps, stamps[1:])]


# --- workers (one subprocess each) ------------------------------------------------------------------

def worker_ours(args) -> dict:
    """`compress finetune --qlora` through its Python entry; step ends are timed from its per-step log line."""
    from compressor.finetune import FinetuneOptions, run_finetune

    stamps: list[float] = []
    started = time.perf_counter()
    memory = {"imported": memory_mib()}

    def echo(line: str) -> None:
        if line.startswith("held-out loss before"):
            memory["loaded_and_evaluated"] = memory_mib()
        if line.startswith("step ") and "/" in line.split(":")[0]:
            stamps.append(time.perf_counter())
            memory.setdefault("step_1", memory_mib())

    options = FinetuneOptions(
        model=MODEL, dataset=args.train, eval_dataset=args.heldout, output=Path(args.out), qlora=True, steps=args.steps,
        lr=SETTINGS["lr"], max_grad_norm=SETTINGS["max_grad_norm"], warmup_steps=SETTINGS["warmup_steps"],
        r=SETTINGS["r"], alpha=SETTINGS["alpha"], dropout=SETTINGS["dropout"], targets="all-linear",
        batch_size=SETTINGS["batch_size"], max_length=SETTINGS["max_length"], seed=SETTINGS["seed"],
        gradient_checkpointing=True, lr_scheduler="cosine", optim="adamw_torch", log_every=1, overwrite=True,
    )
    summary = run_finetune(options, echo=echo)
    return {
        "step_end_times": [t - started for t in stamps],
        "eval_before": summary.eval_loss_before,
        "eval_after": summary.eval_loss_after,
        "train_losses": summary.losses,
        "trainable_params": _adapter_parameters(Path(args.out)),
        "total_seconds": time.perf_counter() - started,
        "memory_mib": {**memory, "end": memory_mib()},
    }


def _rival_records(path: Path) -> list[dict]:
    """Chat records as TRL's conversational prompt/completion format (loss on the completion only)."""
    records = []
    for line in path.read_text().splitlines():
        messages = json.loads(line)["messages"]
        records.append({"prompt": messages[:-1], "completion": messages[-1:]})
    return records


def worker_rival(args) -> dict:
    """The QLoRA recipe as peft's / bitsandbytes' / TRL's docs show it, written plainly."""
    import torch
    from accelerate import Accelerator
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from compressor.finetune_loop import make_loader, mean_loss

    started = time.perf_counter()
    memory = {"imported": memory_mib()}
    path, tokenizer, train_examples, heldout_examples = _tokenizer_and_examples(Path(args.train), Path(args.heldout))
    torch.manual_seed(SETTINGS["seed"])
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, device_map={"": "cpu"})
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=SETTINGS["r"], lora_alpha=SETTINGS["alpha"], lora_dropout=SETTINGS["dropout"],
                      target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)

    stamps: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())
            memory.setdefault("step_1", memory_mib())

    config = SFTConfig(
        output_dir=str(Path(args.out) / "trainer"), max_steps=args.steps, per_device_train_batch_size=SETTINGS["batch_size"],
        gradient_accumulation_steps=1, learning_rate=SETTINGS["lr"], lr_scheduler_type="cosine",
        warmup_steps=SETTINGS["warmup_steps"], max_grad_norm=SETTINGS["max_grad_norm"], weight_decay=0.0,
        optim="adamw_torch", seed=SETTINGS["seed"], max_length=SETTINGS["max_length"], packing=False,
        completion_only_loss=True, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=False, use_cpu=True, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(_rival_records(Path(args.train))),
                         processing_class=tokenizer, callbacks=[StepClock()])
    same = _same_tokens(trainer.train_dataset, train_examples)

    # Harness, not recipe: bitsandbytes' CPU inference repack (README, "NF4 weights stay in
    # bitsandbytes' trainable layout") would break the rival's training after this evaluation.
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    accelerator = Accelerator(cpu=True)
    heldout = make_loader(heldout_examples, SETTINGS["batch_size"], pad_id, SETTINGS["seed"], shuffle=False)
    eval_before = mean_loss(model, heldout, accelerator)
    memory["loaded_and_evaluated"] = memory_mib()
    trainer.train()
    eval_after = mean_loss(model, heldout, accelerator)
    model.save_pretrained(args.out)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return {
        "step_end_times": [t - started for t in stamps],
        "eval_before": eval_before,
        "eval_after": eval_after,
        "train_losses": losses,
        "trainable_params": _adapter_parameters(Path(args.out)),
        "peft_trainable_params": model.get_nb_trainable_parameters()[0],
        "tokenized_like_ours": same,
        "total_seconds": time.perf_counter() - started,
        "memory_mib": {**memory, "end": memory_mib()},
    }


def _same_tokens(dataset, examples) -> dict:
    """How many of TRL's tokenized training records have our input ids and our answer-token mask."""
    from compressor.finetune_data import IGNORE_INDEX

    equal = 0
    for row, example in zip(dataset, examples):
        mask = row.get("completion_mask")
        ours_mask = [int(label != IGNORE_INDEX) for label in example.labels]
        equal += list(row["input_ids"]) == example.input_ids and (mask is None or list(mask) == ours_mask)
    return {"equal": equal, "rival_records": len(dataset), "our_records": len(examples)}


WORKERS = {"ours": worker_ours, "rival": worker_rival}


# --- parent: compare --------------------------------------------------------------------------------

def _run_child(command: list[str]) -> tuple[int, int, float]:
    """(exit status, peak RSS of that child in KiB, wall seconds)."""
    started = time.perf_counter()
    process = subprocess.Popen(command)
    _pid, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_maxrss, time.perf_counter() - started


def _summarise(run: dict) -> dict:
    steps = _intervals(run["step_end_times"])[SKIP_STEPS - 1:]  # intervals ending at step SKIP_STEPS + 1 …
    return {**run, "median_step_s": statistics.median(steps) if steps else None, "timed_steps": len(steps)}


def compare(args) -> dict:
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        raise SystemExit("the rival needs TRL: pip install trl (it leaves torch and transformers as they are)")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qlora_vs_peft_"))
    train, heldout = make_data(work / "data", args.heldout)
    runs: dict[str, list[dict]] = {"ours": [], "rival": []}
    for round_index in range(args.rounds):
        for which in ("ours", "rival"):
            out = work / f"{which}{round_index}"
            result_file = work / f"{which}{round_index}.json"
            command = [sys.executable, __file__, "worker", which, "--train", str(train), "--heldout", str(heldout),
                       "--out", str(out), "--steps", str(args.steps), "--json", str(result_file)]
            print(f"[round {round_index + 1}/{args.rounds}] {which}: {' '.join(command)}", flush=True)
            code, rss_kib, wall = _run_child(command)
            if code != 0:
                raise SystemExit(f"{which} worker failed with exit status {code}")
            run = _summarise(json.loads(result_file.read_text()))
            run.update(peak_rss_mib=rss_kib / 1024, wall_seconds=wall)
            runs[which].append(run)
            print(f"  median step {run['median_step_s']:.3f} s, peak RSS {run['peak_rss_mib']:.0f} MiB, held-out"
                  f" {run['eval_before']:.4f} → {run['eval_after']:.4f}, {run['trainable_params']:,} trainable", flush=True)
    table = {which: _aggregate(rows) for which, rows in runs.items()}
    ratios = {key: table["ours"][key] / table["rival"][key] for key in
              ("median_step_s", "peak_rss_mib", "eval_after", "trainable_params", "wall_seconds")}
    result = {"steps": args.steps, "rounds": args.rounds, "heldout_examples": args.heldout, "settings": SETTINGS,
              "runs": runs, "table": table, "ratios_ours_over_rival": ratios, "environment": _environment()}
    _print_table(table, ratios)
    return result


def _aggregate(rows: list[dict]) -> dict:
    return {
        "median_step_s": statistics.median(r["median_step_s"] for r in rows),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in rows),
        "eval_before": statistics.mean(r["eval_before"] for r in rows),
        "eval_after": statistics.mean(r["eval_after"] for r in rows),
        "eval_after_each": [r["eval_after"] for r in rows],
        "trainable_params": rows[0]["trainable_params"],
        "wall_seconds": statistics.median(r["wall_seconds"] for r in rows),
    }


def _print_table(table: dict, ratios: dict) -> None:
    print("\n| | ours | rival | ours / rival |\n|---|---|---|---|")
    for key, label, fmt in (("median_step_s", "seconds per step (median)", ".3f"), ("peak_rss_mib", "peak RSS, MiB", ".0f"),
                            ("eval_before", "held-out loss before", ".4f"), ("eval_after", "held-out loss after", ".4f"),
                            ("trainable_params", "trainable parameters", ",d"), ("wall_seconds", "process wall seconds", ".1f")):
        ratio = f"{ratios[key]:.3f}" if key in ratios else ""
        print(f"| {label} | {table['ours'][key]:{fmt}} | {table['rival'][key]:{fmt}} | {ratio} |")


def _environment() -> dict:
    import peft
    import torch
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    for name in ("trl", "bitsandbytes", "accelerate"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "omp_threads": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), **versions}


# --- parent: checkpoint (optimizer-state bytes, interrupt + --resume) --------------------------------

def _cli(train: Path, heldout: Path, out: Path, args, optim: str) -> list[str]:
    return [sys.executable, "-m", "compressor.cli", "finetune", MODEL, "--qlora", "--dataset", str(train),
            "--eval-dataset", str(heldout), "--eval-every", "3", "-o", str(out), "--steps", str(args.steps),
            "--batch-size", "2", "--grad-accum", "2", "--max-length", str(SETTINGS["max_length"]),
            "--r", str(SETTINGS["r"]), "--alpha", str(SETTINGS["alpha"]), "--lr", str(SETTINGS["lr"]), "--warmup-steps", "1",
            "--save-every", "2", "--optim", optim, "--log-every", "1", "--overwrite", "-q"]


def _interrupted(command: list[str], after_step: int) -> int:
    """Run until the checkpoint of `after_step` is announced, then SIGTERM; returns the exit status."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    assert process.stdout is not None
    for line in process.stdout:
        print("  | " + line.rstrip(), flush=True)
        if line.startswith(f"checkpoint after step {after_step}:"):
            process.send_signal(signal.SIGTERM)
            break
    process.stdout.read()
    return process.wait()


def _optimizer_state_bytes(file: Path) -> dict:
    import torch

    def tensors_in(value) -> list:
        if torch.is_tensor(value):
            return [value]
        if isinstance(value, dict):
            value = list(value.values())
        return [t for item in value for t in tensors_in(item)] if isinstance(value, (list, tuple)) else []

    # bitsandbytes nests its 8-bit state (quantized moments, block scales) a level deeper than AdamW's
    tensors = tensors_in(torch.load(file, weights_only=True)["optimizer"]["state"])
    return {"file_bytes": file.stat().st_size, "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors),
            "dtypes": sorted({str(t.dtype) for t in tensors})}


def _digest(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def checkpoint(args) -> dict:
    from compressor.checkpoint import workdir_for
    from compressor.finetune_resume import CHECKPOINT_FOLDER

    work = Path(args.workdir or tempfile.mkdtemp(prefix="qlora_resume_"))
    train, heldout = make_data(work / "data", 8)
    result: dict = {"steps": args.steps, "interrupt_after": args.interrupt_after, "environment": _environment(), "optims": {}}
    for optim in args.optim:
        whole, broken = work / f"{optim}-whole", work / f"{optim}-resumed"
        command = _cli(train, heldout, whole, args, optim)
        print(f"{optim}, uninterrupted: {' '.join(command)}", flush=True)
        subprocess.run(command, check=True)
        command = _cli(train, heldout, broken, args, optim)
        print(f"{optim}, stopped after the checkpoint of step {args.interrupt_after}: {' '.join(command)}", flush=True)
        status = _interrupted(command, args.interrupt_after)
        if broken.exists():
            raise SystemExit(f"the interrupted run finished before SIGTERM reached it (exit {status}); nothing was interrupted")
        folder = workdir_for(broken) / CHECKPOINT_FOLDER
        kept = json.loads((folder / "state.json").read_text())["step"]
        state = _optimizer_state_bytes(folder / "optimizer.pt")
        print(f"{optim}: exit {status}, checkpoint of step {kept} kept, optimizer state {state}", flush=True)
        print(f"{optim}, --resume: {' '.join(command + ['--resume'])}", flush=True)
        subprocess.run(command + ["--resume"], check=True)
        result["optims"][optim] = {"interrupted_exit": status, "checkpoint_step": kept, "optimizer_state": state,
                                   **_same_run(whole, broken)}
    print(json.dumps(result["optims"], indent=2))
    return result


def _same_run(whole: Path, resumed: Path) -> dict:
    a, b = (json.loads((folder / "training.json").read_text()) for folder in (whole, resumed))
    curves = ("losses", "grad_norms", "learning_rates", "eval_curve", "eval_loss_before", "eval_loss_after")
    return {
        "adapter_sha256": _digest(whole / "adapter_model.safetensors"),
        "adapter_bit_identical": (whole / "adapter_model.safetensors").read_bytes() == (resumed / "adapter_model.safetensors").read_bytes(),
        "curves_identical": {name: a[name] == b[name] for name in curves},
        "resumed_from": b["resumed_from"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    c = sub.add_parser("compare", help="ours vs the peft/TRL recipe, alternating subprocesses")
    c.add_argument("--steps", type=int, default=10)
    c.add_argument("--rounds", type=int, default=1, help="alternations ours, rival (each a fresh subprocess)")
    c.add_argument("--heldout", type=int, default=16, help="held-out examples (the first N of the 97)")
    c.add_argument("--workdir", help="where data and adapters go (default: a temp folder)")
    c.add_argument("--json")
    k = sub.add_parser("checkpoint", help="optimizer-state bytes of a --save-every checkpoint; interrupt + --resume")
    k.add_argument("--steps", type=int, default=6)
    k.add_argument("--interrupt-after", type=int, default=4, help="an even step below --steps (checkpoints every 2)")
    k.add_argument("--optim", action="append", help="repeatable (default: adamw_torch and adamw_8bit)")
    k.add_argument("--workdir")
    k.add_argument("--json")
    w = sub.add_parser("worker", help="(internal) one training run, in its own process")
    w.add_argument("which", choices=sorted(WORKERS))
    for flag in ("--train", "--heldout", "--out", "--json"):
        w.add_argument(flag, required=True)
    w.add_argument("--steps", type=int, required=True)
    args = parser.parse_args()
    if args.part == "worker":
        Path(args.json).write_text(json.dumps(WORKERS[args.which](args), indent=2) + "\n")
        return
    if args.part == "checkpoint":
        args.optim = args.optim or ["adamw_torch", "adamw_8bit"]
        if args.interrupt_after % 2 or not 0 < args.interrupt_after < args.steps:
            parser.error("--interrupt-after must be an even step below --steps")
    result = compare(args) if args.part == "compare" else checkpoint(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
