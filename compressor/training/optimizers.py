"""`compress finetune --optim NAME`: the optimizers a QLoRA user picks, by transformers' names.

`adamw_torch` is torch's AdamW. The others are bitsandbytes' own optimizer classes
(`bitsandbytes.optim`): 8-bit ones keep Adam's (or Lion's) state in block-wise quantized uint8,
about a quarter of the 32-bit state's memory (tensors under 4096 elements keep 32-bit state, as
bitsandbytes decides). Paged ones allocate that state in CUDA unified memory, so it is paged
out to CPU memory when the GPU runs short: that needs a CUDA GPU. bitsandbytes 0.50 on a
machine without one falls back to the unpaged optimizer with a warning; we refuse the name
instead, pointing at the unpaged twin, so a run never says "paged" for something that is not.
Measured on this CPU-only machine (bitsandbytes 0.50.2): every unpaged name below runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from compressor.extras import install_hint


@dataclass(frozen=True)
class OptimizerChoice:
    words: str  # for the log and the adapter card
    build: Callable[[list[torch.nn.Parameter], float, float], torch.optim.Optimizer]  # (params, lr, weight decay)
    bitsandbytes: bool = False
    unpaged: str | None = None  # a paged optimizer's twin without paging (set: needs CUDA)


def _torch_adamw(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _bnb(class_name: str, **fixed) -> Callable[[list[torch.nn.Parameter], float, float], torch.optim.Optimizer]:
    def build(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        import bitsandbytes

        return getattr(bitsandbytes.optim, class_name)(params, lr=lr, weight_decay=weight_decay, **fixed)

    return build


OPTIMIZERS: dict[str, OptimizerChoice] = {
    "adamw_torch": OptimizerChoice("AdamW (torch)", _torch_adamw),
    "adamw_8bit": OptimizerChoice("AdamW, 8-bit state (bitsandbytes AdamW8bit)", _bnb("AdamW8bit"), True),
    "adamw_bnb_8bit": OptimizerChoice("AdamW, 8-bit state (bitsandbytes AdamW8bit)", _bnb("AdamW8bit"), True),
    "paged_adamw_8bit": OptimizerChoice("paged AdamW, 8-bit state (bitsandbytes PagedAdamW8bit)", _bnb("PagedAdamW8bit"), True, "adamw_8bit"),
    "paged_adamw_32bit": OptimizerChoice("paged AdamW, 32-bit state (bitsandbytes PagedAdamW32bit)", _bnb("PagedAdamW32bit"), True, "adamw_torch"),
    "lion_8bit": OptimizerChoice("Lion, 8-bit state (bitsandbytes Lion8bit)", _bnb("Lion8bit"), True),
    "lion_32bit": OptimizerChoice("Lion, 32-bit state (bitsandbytes Lion32bit)", _bnb("Lion32bit"), True),
    "paged_lion_8bit": OptimizerChoice("paged Lion, 8-bit state (bitsandbytes PagedLion8bit)", _bnb("PagedLion8bit"), True, "lion_8bit"),
    "paged_lion_32bit": OptimizerChoice("paged Lion, 32-bit state (bitsandbytes PagedLion32bit)", _bnb("PagedLion32bit"), True, "lion_32bit"),
}


def optimizer_problem(name: str, cuda_available: bool, has_bitsandbytes: bool) -> str | None:
    """Why `--optim name` cannot run here (None: it can), in one line."""
    choice = OPTIMIZERS[name]
    if choice.bitsandbytes and not has_bitsandbytes:
        return f"{name} is a bitsandbytes optimizer; {install_hint('bitsandbytes')}, or use adamw_torch"
    if choice.unpaged is not None and not cuda_available:
        return (f"{name} pages its state through CUDA unified memory and needs a CUDA GPU, which this machine lacks;"
                f" {choice.unpaged} is the same optimizer without paging")
    return None


def build_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return OPTIMIZERS[name].build(params, lr, weight_decay)
