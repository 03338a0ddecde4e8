"""Loop options of the distill stage that change how, not what, it computes: gradient
accumulation and gradient checkpointing train the same weights as the plain loop; the lr schedule;
the stage's own `data:` block."""

from __future__ import annotations

import math

import torch

from compressor.cli import main
from compressor.stages import distill_run
from compressor.training.distill_loop import run_distillation
from compressor.training.trainable import select_trainable
from tests.test_distill import _kl_loss, _settings, _tiny


def _train(tiny_llama, windows, **settings):
    student, teacher = _tiny(tiny_llama), _tiny(tiny_llama)
    with torch.no_grad():  # a gap for the student to close
        for module in student.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(0.9)
    forwards, block_forwards = [], []
    student.register_forward_hook(lambda *_: forwards.append(1))
    student.model.layers[0].input_layernorm.register_forward_pre_hook(lambda *_: block_forwards.append(1))
    trainable = select_trainable(student, "unquantized", ["lm_head"])
    result = run_distillation(student, teacher, windows, _kl_loss(), trainable, _settings(**{"steps": 3, **settings}),
                              checkpoint_dir=None, resume=False, show_progress=False, autocast_dtype=None, cpu=True)
    trainable.finish()
    return student.state_dict(), result, (len(forwards), len(block_forwards))


def test_gradient_accumulation_matches_one_bigger_batch(tiny_llama):
    # Every window is the same, so any batch draws the same data: 2 micro-batches of 1 must
    # give the gradients of one batch of 2 (the loss is divided by the micro-batch count).
    windows = torch.randint(3, 384, (1, 24), generator=torch.Generator().manual_seed(0)).repeat(4, 1)
    whole, whole_run, whole_forwards = _train(tiny_llama, windows, batch_size=2, gradient_accumulation=1, max_grad_norm=None)
    split, split_run, split_forwards = _train(tiny_llama, windows, batch_size=1, gradient_accumulation=2, max_grad_norm=None)
    assert (whole_forwards[0], split_forwards[0]) == (3, 6)
    for name, value in whole.items():
        torch.testing.assert_close(split[name], value, rtol=1e-4, atol=1e-6, msg=name)
    for a, b in zip(whole_run.curve, split_run.curve):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"]))


def test_gradient_checkpointing_recomputes_and_trains_the_same(tiny_llama):
    windows = torch.randint(3, 384, (8, 24), generator=torch.Generator().manual_seed(1))
    plain, _, plain_forwards = _train(tiny_llama, windows)
    checkpointed, _, checkpointed_forwards = _train(tiny_llama, windows, gradient_checkpointing=True)
    # A checkpointed block runs its forward again during the backward pass (from its first module:
    # torch stops the recomputation once it has what the backward needs).
    assert plain_forwards == (3, 3) and checkpointed_forwards == (3, 6)
    for name, value in plain.items():
        torch.testing.assert_close(checkpointed[name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_cosine_schedule_with_warmup_sets_each_steps_lr(tiny_llama, monkeypatch):
    windows = torch.randint(3, 384, (8, 24), generator=torch.Generator().manual_seed(2))
    used = []
    adamw_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return adamw_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    _, result, _ = _train(tiny_llama, windows, steps=4, schedule="cosine", warmup_steps=1, lr=1e-3)
    # Step s (from 1) runs at lr · (s − 1) / warmup while s ≤ warmup, then at
    # lr · ½(1 + cos(π (s − 1 − warmup) / (steps − warmup))): the log shows the rate each step used.
    expected = [0.0, 1e-3, 1e-3 * 0.5 * (1 + math.cos(math.pi / 3)), 1e-3 * 0.5 * (1 + math.cos(2 * math.pi / 3))]
    assert [row["step"] for row in result.curve] == [1, 2, 3, 4]
    assert used == [row["lr"] for row in result.curve]
    for row, lr in zip(result.curve, expected):
        assert abs(row["lr"] - lr) < 1e-12, (row, lr)


def test_distill_data_block_replaces_the_calibration_windows(tiny_llama, tmp_path, monkeypatch):
    seen = []
    original = distill_run.run_distillation

    def recording(student, teacher, windows, *args, **kwargs):
        seen.append(tuple(windows.shape))
        return original(student, teacher, windows, *args, **kwargs)

    monkeypatch.setattr(distill_run, "run_distillation", recording)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: own-data\ncalibration: {samples: 8, seq_len: 32}\nstages:\n"
        "  - distill: {steps: 1, batch_size: 2, train: unquantized, data: {dataset: builtin:abstracts, samples: 3, seq_len: 16, seed: 1}}\n"
    )
    assert main([str(tiny_llama), "--recipe", str(recipe), "-o", str(tmp_path / "out"), "-q", "--no-perplexity"]) == 0
    assert seen == [(3, 16)]
