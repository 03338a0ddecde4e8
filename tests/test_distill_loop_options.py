"""Loop options of the distill stage that change how, not what, it computes: gradient
accumulation and gradient checkpointing train the same weights as the plain loop."""

from __future__ import annotations

import torch

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
    result = run_distillation(student, teacher, windows, _kl_loss(), trainable, _settings(steps=3, **settings),
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
