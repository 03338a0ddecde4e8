"""Numeric and disk guards, and the cleanup of staging folders left by killed runs."""

from __future__ import annotations

import os
import shutil
from collections import namedtuple

import pytest
import torch
from torch import nn

from compressor import guards
from compressor.checkpoint import atomic_output_dir, remove_stale_staging
from compressor.errors import CompressionError, UserError


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def test_assert_finite_names_module_and_stage():
    model = _model()
    guards.assert_finite(model, "stage 1 (quantize)")
    with torch.no_grad():
        model[2].weight[1, 3] = float("nan")
    with pytest.raises(CompressionError, match=r"stage 2 \(prune\) left NaN or Inf in 2\.weight"):
        guards.assert_finite(model, "stage 2 (prune)")


def test_assert_finite_checks_buffers():
    model = _model()
    model[0].register_buffer("weight_scale", torch.tensor([1.0, float("inf")]))
    with pytest.raises(CompressionError, match=r"0\.weight_scale"):
        guards.assert_finite(model, "stage 1 (quantize)")


def test_state_bytes_counts_tied_tensors_once():
    model = _model()
    expected = sum(p.numel() * 4 for p in model.parameters())
    assert guards.state_bytes(model) == expected
    tied = nn.ModuleDict({"a": nn.Linear(4, 4, bias=False), "b": nn.Linear(4, 4, bias=False)})
    tied["b"].weight = tied["a"].weight
    assert guards.state_bytes(tied) == 16 * 4


def test_check_free_space_refuses_a_full_disk(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(guards.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(UserError, match="not enough free disk space") as caught:
        guards.check_free_space(tmp_path / "new" / "out", 500 * 10**6)
    assert str(tmp_path / "new" / "out") in caught.value.format()
    monkeypatch.setattr(guards.shutil, "disk_usage", lambda path: usage(10**12, 0, 10**12))
    guards.check_free_space(tmp_path / "new" / "out", 500 * 10**6)


def test_stale_staging_of_dead_process_is_removed(tmp_path):
    out = tmp_path / "out"
    dead = tmp_path / ".out.partial-dead"
    dead.mkdir()
    child = os.fork() if hasattr(os, "fork") else None
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)
    (dead / ".owner-pid").write_text(str(child))
    merged = tmp_path / ".out.merged-dead"  # a merge's scratch model, left by a SIGKILL
    merged.mkdir()
    (merged / ".owner-pid").write_text(str(child))
    alive = tmp_path / ".out.partial-alive"
    alive.mkdir()
    (alive / ".owner-pid").write_text(str(os.getpid()))
    removed = remove_stale_staging(out)
    assert sorted(removed) == sorted([dead, merged])
    assert alive.exists() and not dead.exists() and not merged.exists()
    shutil.rmtree(alive)


def test_atomic_output_leaves_no_owner_file(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as staging:
        (staging / "model.safetensors").write_bytes(b"x")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_write_removes_staging(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as staging:
            (staging / "half").write_bytes(b"x")
            raise RuntimeError("disk went away")
    assert list(tmp_path.iterdir()) == []
