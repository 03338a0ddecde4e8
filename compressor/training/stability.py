"""Warm-up and gradient clipping for the LoRA training loops (`compress finetune`, `lowrank: {method: lora}`).

Defaults follow the QLoRA recipe (Dettmers et al., 2023): clip the global gradient norm at 0.3 and
warm the learning rate up linearly over about 3 % of the steps, then decay it along a cosine to 0.
Small batches of short answers give noisy gradients; the clip bounds what one outsized batch can do
(Adam alone rescales by running averages, so a sudden spike still moves the adapters several times
further than a typical step), and the warm-up keeps the first steps small while Adam's second-moment
estimates are still based on a handful of batches.
"""

from __future__ import annotations

import torch

QLORA_MAX_GRAD_NORM = 0.3
WARMUP_SHARE = 0.03
# After the warm-up, by transformers' get_scheduler names ("constant" keeps the warm-up).
LR_SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def default_warmup_steps(steps: int) -> int:
    """About 3 % of the steps (0 for runs shorter than 17 steps); always fewer than `steps`."""
    return min(int(round(WARMUP_SHARE * steps)), steps - 1)


def warmup_problem(warmup_steps: int, steps: int) -> str | None:
    """Why `warmup_steps` does not fit a run of `steps` steps, or None."""
    if warmup_steps < 0:
        return f"must be 0 or more, got {warmup_steps}"
    if warmup_steps >= steps:
        return f"must be fewer than the steps ({steps}), got {warmup_steps}"
    return None


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, steps: int):
    """lr × step/warm-up for the first steps (0 at step 0, the full lr at step `warmup_steps`),
    then a cosine from the full lr down to 0 at step `steps` (transformers' schedule)."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps, num_training_steps=steps)


def warmup_schedule(optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int, steps: int):
    """The linear warm-up, then transformers' schedule `kind` (cosine, linear, constant_with_warmup)."""
    from transformers import get_scheduler

    return get_scheduler(kind, optimizer, num_warmup_steps=warmup_steps, num_training_steps=steps)


def clip_gradients(parameters, max_grad_norm: float, clip=torch.nn.utils.clip_grad_norm_) -> float:
    """Global-norm clip when `max_grad_norm` > 0 (0 disables); returns the norm before clipping.

    `clip` is accelerate's `Accelerator.clip_grad_norm_` where one drives the loop (it unscales
    mixed-precision gradients and handles sharded models first)."""
    parameters = [p for p in parameters if p.grad is not None]
    if max_grad_norm > 0:
        return float(clip(parameters, max_grad_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in parameters]))) if parameters else 0.0
