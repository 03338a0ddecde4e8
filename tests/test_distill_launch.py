"""The distill stage under `accelerate launch` with two CPU processes (gloo), the command unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from compressor.cli import main

RECIPE = """name: two-processes
calibration: {samples: 8, seq_len: 32}
stages:
  - quantize: {method: rtn, weights: {bits: 4, group_size: 32}}
  - distill: {loss: {kind: kl}, train: lora, rank: 2, steps: 3, lr: 1.0e-2, batch_size: 2, checkpoint_every: 2}
"""


def test_two_process_distill_saves_once(tiny_llama, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        # `--multi_gpu` on a machine without CUDA runs torchrun; accelerate then uses gloo on the CPU.
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "compressor.cli", str(tiny_llama),
        "--recipe", str(recipe), "-o", str(out), "--no-perplexity",
    ]
    # Kept small (tiny model, 3 steps): about 30 s on 2 shared cores, most of it two interpreters starting.
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines.count(f"saved: {out}") == 1, result.stdout  # process 1 saved, and only it
    assert sum(line.startswith("process 2 of 2: every stage done") for line in lines) == 1, result.stdout
    assert sum(line.startswith("stage 2/2: distill") for line in lines) == 2, result.stdout  # both ran the stage

    summary = json.loads((out / "compression.json").read_text())["training"]["stage-2-distill"]
    assert summary["processes"] == 2 and summary["steps"] == 3
    curve = json.loads((out / "stage-2-distill.json").read_text())["curve"]
    assert [row["step"] for row in curve] == [1, 2, 3]
    adapter = load_file(str(out / "lowrank_adapter" / "adapter_model.safetensors"))
    assert adapter and any(t.abs().max() > 0 for k, t in adapter.items() if "lora_B" in k)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yaml"]  # no work folder or staging left


@pytest.mark.parametrize("variable, name", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_sharded_launch_is_refused_before_any_weight_is_read(variable, name, tiny_llama, tmp_path, monkeypatch, capsys):
    # What `accelerate launch --config_file fsdp.yaml` (or a DeepSpeed config) sets in each process.
    monkeypatch.setenv(variable, "true")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    assert main([str(tiny_llama), "--recipe", str(recipe), "--dry-run", "-q"]) == 2
    err = capsys.readouterr().err
    assert f"accelerate {name} config" in err and "--multi_gpu" in err, err
    monkeypatch.setenv(variable, "false")
    assert main([str(tiny_llama), "--recipe", str(recipe), "--dry-run", "-q"]) == 0
