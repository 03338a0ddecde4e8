"""`--max-memory` with a distill stage: the frozen `base` teacher is loaded with accelerate's
device map (blocks left on disk), gives the same logits, and the distilled model is unchanged."""

from __future__ import annotations

from pathlib import Path

import torch

from compressor.cli import main
from compressor.model_io import load_model
from compressor.offload import has_offloaded_weights
from compressor.stages import distill_run

RECIPE = """name: distill-offload
calibration: {samples: 8, seq_len: 32}
stages:
  - quantize: {method: rtn, weights: {bits: 4, group_size: 32}}
  - distill: {loss: [{kind: kl, temperature: 2.0}, {kind: mse_hidden, layers: [[2, 2]]}], train: scales, steps: 2, lr: 1.0e-3, batch_size: 2}
"""


def test_offloaded_teacher_gives_the_same_logits_and_the_same_result(tiny_llama, tmp_path, monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    teachers: list[torch.nn.Module] = []
    load_teacher = distill_run._teacher

    def recording_teacher(config, ctx):
        teacher = load_teacher(config, ctx)
        teachers.append(teacher)
        return teacher

    monkeypatch.setattr(distill_run, "_teacher", recording_teacher)
    common = [str(tiny_llama), "--recipe", str(recipe), "-q", "--no-perplexity"]
    assert main(common + ["-o", str(tmp_path / "memory")]) == 0
    assert main(common + ["-o", str(tmp_path / "disk"), "--max-memory", "60KB"]) == 0

    in_memory, offloaded = teachers
    assert not has_offloaded_weights(in_memory)
    assert has_offloaded_weights(offloaded) and "disk" in set(offloaded.hf_device_map.values())
    assert not any(p.requires_grad for p in offloaded.parameters())
    reference = load_model(str(tiny_llama)).model
    ids = torch.tensor([[1, 5, 9, 33, 70, 120, 7, 2]])
    with torch.no_grad():
        torch.testing.assert_close(offloaded(ids).logits, reference(ids).logits, rtol=0, atol=0)
    # Same teacher outputs, same student start: the distilled checkpoints are byte-identical.
    memory, disk = Path(tmp_path / "memory"), Path(tmp_path / "disk")
    assert (disk / "model.safetensors").read_bytes() == (memory / "model.safetensors").read_bytes()
