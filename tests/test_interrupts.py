"""Killing a compression at different points never leaves an OUT that looks complete.

A real `compress` process runs a two-stage recipe on a tiny model; it is stopped with
SIGKILL, SIGTERM or SIGINT as it reaches given points (before the first stage, inside each
stage, while saving). Afterwards OUT is absent, or complete if the run won the race. A later
successful run removes the staging folders that SIGKILL left behind.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

RECIPE = """name: two-stage
calibration: {samples: 64, seq_len: 128}
stages:
  - quantize: {method: gptq, weights: {bits: 4, group_size: 32}, targets: ["re:.*mlp.*"]}
  - quantize: {method: gptq, weights: {bits: 8, group_size: null}, targets: ["re:.*self_attn.*"]}
"""

# (line that arms the signal or None for "as soon as the process starts", delay after it, signal)
KILL_POINTS = [
    (None, 1.0, signal.SIGKILL),  # while importing and loading
    ("stage 1/2", 0.0, signal.SIGINT),
    ("stage 1/2", 0.3, signal.SIGTERM),
    ("stage 2/2", 0.0, signal.SIGKILL),
    ("stage 2/2", 0.6, signal.SIGKILL),  # late in the last stage or while saving
    ("stage 2/2", 0.9, signal.SIGTERM),
]

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -signal.SIGKILL}


def _start(model: Path, recipe: Path, out: Path, cache: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", COMPRESSOR_CACHE=str(cache), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "compressor.cli", str(model), "--recipe", str(recipe), "-o", str(out), "-q", "--no-perplexity"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _stop_at(process: subprocess.Popen, trigger: str | None, delay: float, signum: int) -> tuple[str, str]:
    """Send `signum` `delay` seconds after `trigger` appears on stdout; return (stdout, stderr)."""
    seen: list[str] = []

    def send() -> None:
        time.sleep(delay)
        if process.poll() is None:
            process.send_signal(signum)

    if trigger is None:
        threading.Thread(target=send, daemon=True).start()
    assert process.stdout is not None
    for line in process.stdout:
        seen.append(line)
        if trigger is not None and line.startswith(trigger):
            threading.Thread(target=send, daemon=True).start()
            trigger = None
    stderr = process.stderr.read() if process.stderr else ""
    process.wait(timeout=300)
    return "".join(seen), stderr


def _assert_complete(out: Path) -> None:
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "compression.json", "recipe.yaml"} <= names, names
    json.loads((out / "compression.json").read_text())


def test_killed_runs_leave_no_partial_output(tiny_llama, tmp_path):
    recipe = tmp_path / "two.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "runs" / "out"
    cache = tmp_path / "cache"
    stopped_early = 0
    for trigger, delay, signum in KILL_POINTS:
        process = _start(tiny_llama, recipe, out, cache)
        stdout, stderr = _stop_at(process, trigger, delay, signum)
        if out.exists():  # the run renamed OUT into place before the signal landed: it must be whole
            assert "saved:" in stdout or process.returncode != 0, stderr
            _assert_complete(out)
            shutil.rmtree(out)
            continue
        stopped_early += 1
        assert process.returncode == EXIT_CODES[signum], (signum, process.returncode, stderr)
        assert not out.exists(), f"OUT exists after {signum!r} at {trigger}+{delay}s"
        if signum != signal.SIGKILL:
            *notes, last = stderr.strip().splitlines()
            assert last in {"interrupted: the output was not written", "terminated: the output was not written"}, stderr
            # Stopped after stage 1's checkpoint: one line says where it stays and how to go on.
            assert all(".out.work: stages 1-1 are kept there" in note and "--resume" in note for note in notes), stderr
            assert len(notes) <= 1, stderr
            assert not list(out.parent.glob(".out.work/stage-*.partial")), "a half-written stage checkpoint was left"
            assert not list(out.parent.glob(".out.partial-*")) if out.parent.exists() else True
    # The signals sent as a stage starts always land; the delayed ones may lose the race on a fast machine.
    assert stopped_early >= 3, "too few runs were stopped before finishing to test anything"

    process = _start(tiny_llama, recipe, out, cache)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    _assert_complete(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"], "stale staging folders were not removed"


def _small_file_limit() -> None:
    # A file size limit turns every large write into EFBIG, as a full disk gives ENOSPC; with
    # SIGXFSZ ignored the write fails with the error instead of killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


def test_a_write_the_disk_refuses_is_one_line_and_leaves_nothing(tiny_llama, tmp_path):
    recipe = tmp_path / "two.yaml"
    recipe.write_text(RECIPE.replace("samples: 64, seq_len: 128", "samples: 4, seq_len: 32"))
    out = tmp_path / "runs" / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", COMPRESSOR_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "compressor.cli", str(tiny_llama), "--recipe", str(recipe), "-o", str(out), "-q", "--no-perplexity"]
    process = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, preexec_fn=_small_file_limit)
    assert process.returncode == 1, process.stderr
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("write failed: ") and "File too large" in lines[0], process.stderr
    # Stage 1's checkpoint could not be written: no OUT, no staging folder, no empty work folder, no
    # lock file; and OUT's parent, made by this run, is removed again.
    assert not out.parent.exists(), list(out.parent.iterdir())

