"""Run under `accelerate launch` by tests/test_distill_launch.py: the distillation loop on a tiny
pruned model; every process writes what it trained, so the test can compare the processes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from compressor.algorithms.distill_losses import loss_registry
from compressor.stages.distill import LossSpec
from compressor.training.distill_loop import LoopSettings, WeightedLoss, run_distillation
from compressor.training.trainable import select_trainable


def main(model_dir: str, out: str, accumulation: int) -> None:
    student = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, module in student.named_modules():
            if name.endswith(("mlp.up_proj", "mlp.gate_proj", "mlp.down_proj")):
                module.weight[:, ::2] = 0  # half of every row pruned: a mask the loop must keep
    initial = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainable = select_trainable(student, "auto", ["lm_head"])
    windows = torch.randint(3, 384, (16, 24), generator=torch.Generator().manual_seed(0))
    settings = LoopSettings(steps=6, lr=1e-4, schedule="cosine", warmup_steps=1, batch_size=2, gradient_accumulation=accumulation,
                            gradient_checkpointing=False, max_grad_norm=1.0, weight_decay=0.0, checkpoint_every=None,
                            log_every=1, seed=0)
    losses = [WeightedLoss("kl", loss_registry().get("kl"), LossSpec(kind="kl"))]
    result = run_distillation(student, teacher, windows, losses, trainable, settings, checkpoint_dir=None, resume=False,
                              show_progress=False, autocast_dtype=None, cpu=True)
    masks = sorted(trainable.masks)
    trainable.finish()
    rank = torch.distributed.get_rank()
    changed = sorted(n for n, p in student.named_parameters() if not torch.equal(p, initial[n]))
    save_file({n: p.detach().contiguous() for n, p in student.named_parameters()}, f"{out}/rank{rank}.safetensors")
    Path(f"{out}/rank{rank}.json").write_text(json.dumps({
        "processes": result.processes, "backend": result.backend, "curve": result.curve, "masks": masks, "changed": changed,
    }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
