"""Helpers for the training-loop tests (`compress finetune`, the lowrank lora stage)."""

from __future__ import annotations

import torch


class StepNorms:
    """Records, for every optimizer step (a global pre-step hook), the global gradient norm it
    sees, i.e. after any clipping the loop did, and the lr of its first parameter group."""

    def __init__(self):
        self.norms: list[float] = []
        self.rates: list[float] = []

    def __enter__(self) -> "StepNorms":
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self._handle = register_optimizer_step_pre_hook(self._record)
        return self

    def _record(self, optimizer, args, kwargs) -> None:
        grads = [p.grad.float().norm() for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.norms.append(float(torch.stack(grads).norm()))
        self.rates.append(float(optimizer.param_groups[0]["lr"]))

    def __exit__(self, *exc) -> None:
        self._handle.remove()
