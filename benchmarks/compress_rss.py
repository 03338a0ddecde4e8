#!/usr/bin/env python
"""Peak memory of a whole `compress` run, split into anonymous memory and file-backed pages.

    python benchmarks/compress_rss.py [--max-memory 100MB] [-- extra compress flags]

Runs `compress builtin:smollm2-135m-instruct --recipe w4a16-gptq` (the demo's job) in a child
process and samples /proc/PID/status every 0.2 s: VmRSS (what `time -v` reports as the maximum
resident set), RssAnon (memory the process allocated) and RssFile (pages of shared libraries and
memory-mapped checkpoints, which the kernel can drop and re-read). Peaks are per field, so
they need not add up. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIELDS = ("VmRSS", "RssAnon", "RssFile")


def sample(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in FIELDS:
                    values[key] = int(rest.split()[0]) // 1024  # MB
    except FileNotFoundError:
        pass
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--recipe", default="w4a16-gptq")
    parser.add_argument("--max-memory")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--timeline", type=Path, help="also write every sample as CSV: seconds,vmrss,rssanon,rssfile (MB)")
    parser.add_argument("extra", nargs="*", help="more compress flags (after --)")
    args = parser.parse_args()

    out = Path(tempfile.mkdtemp(prefix="compress-rss-"))
    command = [sys.executable, "-m", "compressor.cli", args.model, "--recipe", args.recipe, "-o", str(out / "out"), "-q"]
    if args.max_memory:
        command += ["--max-memory", args.max_memory]
    command += args.extra
    peaks = dict.fromkeys(FIELDS, 0)
    timeline: list[str] = []
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    while child.poll() is None:
        values = sample(child.pid)
        for key, value in values.items():
            peaks[key] = max(peaks[key], value)
        if values:
            timeline.append(f"{time.perf_counter() - started:.1f}," + ",".join(str(values.get(key, 0)) for key in FIELDS))
        time.sleep(0.2)
    seconds = time.perf_counter() - started
    if args.timeline:
        args.timeline.write_text("seconds,vmrss,rssanon,rssfile\n" + "\n".join(timeline) + "\n")
    output = child.stdout.read() if child.stdout else ""
    shutil.rmtree(out, ignore_errors=True)
    if child.returncode != 0:
        raise SystemExit(f"compress failed ({child.returncode}):\n{output[-2000:]}")
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(command[2:]),
        "wall_s": round(seconds, 1),
        "peak_mb": {key.lower(): value for key, value in peaks.items()},
        "summary": [line for line in output.splitlines() if line.startswith(("size:", "held-out", "base held-out"))],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
