"""The distill stage under `accelerate launch` with two CPU processes (gloo), the command unchanged:
data-parallel, and DeepSpeed ZeRO 1 / 2 where deepspeed is installed (FSDP and ZeRO 3 are refused)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compressor.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    # The launched processes import this checkout's `compressor`, not whichever one is installed.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}

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
    env = _env()
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


def test_fsdp_launch_is_refused_before_any_weight_is_read(tiny_llama, tmp_path, monkeypatch, capsys):
    # What `accelerate launch --config_file fsdp.yaml` sets in each process.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    assert main([str(tiny_llama), "--recipe", str(recipe), "--dry-run", "-q"]) == 2
    err = capsys.readouterr().err
    assert "accelerate FSDP config" in err and "--multi_gpu" in err and "ZeRO stage 1 or 2" in err, err
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert main([str(tiny_llama), "--recipe", str(recipe), "--dry-run", "-q"]) == 0


def test_deepspeed_zero3_or_missing_deepspeed_is_refused(tiny_llama, tmp_path, monkeypatch, capsys):
    import importlib.util

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    assert main([str(tiny_llama), "--recipe", str(recipe), "--dry-run", "-q"]) == 2
    err = capsys.readouterr().err
    installed = importlib.util.find_spec("deepspeed") is not None
    assert ("ZeRO stage 3" if installed else "pip install 'compressor[gpu]'") in err, err
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert main([str(tiny_llama), "--recipe", str(recipe), "--dry-run", "-q"]) == (0 if installed else 2)


def _deepspeed_config(tmp_path: Path, stage: int) -> Path:
    # What `accelerate config` writes for DeepSpeed; its accumulation and clipping are replaced by the recipe's.
    path = tmp_path / f"zero{stage}.yaml"
    path.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\nnum_machines: 1\nnum_processes: 2\n"
        "mixed_precision: 'no'\ndeepspeed_config:\n"
        f"  zero_stage: {stage}\n  gradient_accumulation_steps: 1\n  gradient_clipping: 1.0\n"
        "  offload_optimizer_device: none\n  offload_param_device: none\n  zero3_init_flag: false\n"
    )
    return path


def _launch(config: Path, *arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), *arguments]
    # Two interpreters importing deepspeed and torch on 2 shared cores: about a minute.
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=400, cwd=cwd)


def test_deepspeed_zero1_processes_train_the_same_weights_and_keep_masks(tiny_llama, tmp_path):
    """Each process draws different batches; ZeRO must leave both with the same, masked, trained weights."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "out"
    out.mkdir()
    script = Path(__file__).with_name("distill_rank_script.py")
    result = _launch(_deepspeed_config(tmp_path, 1), str(script), str(tiny_llama), str(out), "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    logs = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    weights = [load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1)]
    assert all(log["processes"] == 2 and log["backend"] == "deepspeed" for log in logs)
    assert logs[0]["curve"] == logs[1]["curve"] and [row["step"] for row in logs[0]["curve"]] == [1, 2, 3, 4, 5, 6]
    losses = [row["loss"] for row in logs[0]["curve"]]
    assert losses[-1] < losses[0], losses
    lrs = [row["lr"] for row in logs[0]["curve"]]
    # The recipe's warm-up then cosine drives the optimizer ZeRO wraps (each step logs the rate it used).
    assert lrs[0] < lrs[1] and lrs[1:] == sorted(lrs[1:], reverse=True) and lrs[1] > lrs[-1], lrs
    assert logs[0]["masks"] and logs[0]["masks"] == logs[1]["masks"]
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
    up = [name for name in logs[0]["masks"] if name.endswith("mlp.up_proj.weight")]
    assert up and all(name in logs[0]["changed"] for name in up)
    for name in up:
        assert torch.all(weights[0][name][:, ::2] == 0), name


DEEPSPEED_RECIPE = """name: zero2
calibration: {samples: 8, seq_len: 32}
stages:
  - prune: {method: sparsegpt, sparsity: "2:4", ignore: [lm_head]}
  - distill: {loss: {kind: kl}, train: auto, steps: 4, lr: 1.0e-3, batch_size: 2, gradient_accumulation: 2, checkpoint_every: 2}
"""


def test_deepspeed_zero2_launch_distills_and_saves_once(tiny_llama, tmp_path):
    """`accelerate launch --config_file zero2.yaml -m compressor.cli ...`: the compress command unchanged."""
    pytest.importorskip("deepspeed")
    from compressor.algorithms.masks import is_nm_sparse, parse_nm
    from compressor.sparse_format import dense_tensor, sparse_prefixes

    recipe = tmp_path / "r.yaml"
    recipe.write_text(DEEPSPEED_RECIPE)
    out = tmp_path / "out"
    result = _launch(_deepspeed_config(tmp_path, 2), "-m", "compressor.cli", str(tiny_llama), "--recipe", str(recipe),
                     "-o", str(out), "--no-perplexity", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines().count(f"saved: {out}") == 1, result.stdout
    summary = json.loads((out / "compression.json").read_text())["training"]["stage-2-distill"]
    assert summary["processes"] == 2 and summary["backend"] == "deepspeed" and summary["steps"] == 4
    assert summary["last_loss"] < summary["first_loss"], summary
    tensors = load_file(str(out / "model.safetensors"))
    prefixes = sparse_prefixes(tensors)
    assert len(prefixes) == 2 * 7
    for prefix in prefixes:
        assert is_nm_sparse(dense_tensor(tensors, prefix), parse_nm("2:4")), prefix
    from transformers import AutoModelForCausalLM

    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # sparse layers: refused, never random
        AutoModelForCausalLM.from_pretrained(str(out))
    import compressor

    assert compressor.load(out).model.layers[0].mlp.down_proj.nnz > 0  # the runtime loads it
