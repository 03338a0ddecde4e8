#!/usr/bin/env python
"""What lm-eval's `--batch-size auto` tries on a CPU: every trial forward of its batch-size search.

    python benchmarks/eval_batch_auto_cpu.py [--model M] [--tasks perplexity] [--cap-gib 12] [--limit-s 600] [-- extra eval flags]

Runs `compress eval m=MODEL --tasks T --limit 2 --batch-size auto --no-cache` in this process and
logs each forward lm-eval's `_detect_batch_size` makes (batch × tokens, seconds, and the error of a
failed one): lm-eval 0.4.13 starts at `max_batch_size` (its default 64) and, through accelerate's
`find_executable_batch_size`, retries at 0.9 × the size after each out-of-memory error, five
forwards per size. For a rolling-loglikelihood task (perplexity) each trial is batch × the model's
whole context (`max_length`).

`--cap-gib` sets this process's address-space limit (RLIMIT_AS), so an allocation the machine
could not hold fails here (as "DefaultCPUAllocator: can't allocate memory", which the search
treats as out of memory) instead of waking the OOM killer on a shared machine. `--limit-s` stops
the run (SIGALRM) when the search takes longer. Prints one JSON object: the trials, the batch
size lm-eval settled on (if it got there), wall seconds and peak RSS (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


class OutOfTime(Exception):
    pass


def traced_hflm(trials: list[dict]):
    """The runner's HFLM class, logging every forward made while lm-eval searches a batch size."""
    from compressor.evaluation import runner

    base = runner._float32_logits_hflm()

    class Traced(base):
        searching = False

        def _detect_batch_size(self, *args, **kwargs):
            self.searching = True
            try:
                return super()._detect_batch_size(*args, **kwargs)
            finally:
                self.searching = False

        def _model_call(self, inps, *args, **kwargs):
            if not self.searching:
                return super()._model_call(inps, *args, **kwargs)
            started = time.perf_counter()
            trial = {"batch": int(inps.shape[0]), "tokens": int(inps.shape[1])}
            trials.append(trial)
            try:
                return super()._model_call(inps, *args, **kwargs)
            except BaseException as err:
                trial["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:220]}"
                raise
            finally:
                trial["seconds"] = round(time.perf_counter() - started, 2)
                print(f"trial {trial}", file=sys.stderr, flush=True)

    return lambda: Traced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--tasks", default="perplexity")
    parser.add_argument("--cap-gib", type=float, default=12.0, help="address-space limit of this process (0: none)")
    parser.add_argument("--limit-s", type=int, default=600, help="stop after this many seconds")
    parser.add_argument("--json", type=Path)
    parser.add_argument("extra", nargs="*", help="more `compress eval` flags (after --)")
    args = parser.parse_args()

    if args.cap_gib > 0:
        cap = int(args.cap_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    from compressor.cli import main as compress
    from compressor.evaluation import runner

    trials: list[dict] = []
    runner._float32_logits_hflm = traced_hflm(trials)

    def stop(*_):
        raise OutOfTime(f"stopped after {args.limit_s} s")

    signal.signal(signal.SIGALRM, stop)
    signal.alarm(args.limit_s)
    out = Path(tempfile.mkdtemp(prefix="eval-batch-auto-")) / "r"
    argv = ["eval", f"m={args.model}", "--tasks", args.tasks, "--limit", "2", "--batch-size", "auto", "--no-cache", "-q",
            "-o", str(out), *args.extra]
    started = time.perf_counter()
    outcome = "finished"
    try:
        code = compress(argv)
        outcome = f"exit {code}"
    except OutOfTime as err:
        outcome = str(err)
    signal.alarm(0)
    report = out / "report.json"
    result = {
        "command": "compress " + " ".join(argv[:-len(args.extra) or None]),
        "extra": args.extra,
        "cap_gib": args.cap_gib,
        "outcome": outcome,
        "trials": trials,
        "batch_sizes": json.loads(report.read_text())["models"][0]["batch_sizes"] if report.is_file() else None,
        "wall_s": round(time.perf_counter() - started, 1),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
