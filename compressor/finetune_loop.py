"""The `compress finetune` training loop: epochs of shuffled micro-batches, gradient accumulation
with a token-weighted loss, clipping, the lr schedule, held-out evaluation and step checkpoints.

Data order is a pure function of (seed, epoch): each epoch shuffles the examples with a generator
seeded by seed + epoch (epoch 0 is what a RandomSampler seeded with `seed` gives), and accelerate
shards the batches across processes. So step s always sees the same micro-batches, whatever
came before, and a resumed run picks up mid-epoch by skipping the batches already used.

Accumulation: one optimizer step takes `accumulation` micro-batches (an epoch's last step may
take fewer). The loss of a step is the sum of token losses over all its micro-batches, on every
process, divided by their total count of labelled tokens: exactly the loss of one batch made of
all of them (a mean of per-micro-batch means would weight a short micro-batch's tokens more;
transformers' Trainer fixed the same in 4.46 with `num_items_in_batch`). DDP averages gradients
over processes, so each process's share is multiplied by the number of processes.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from compressor.finetune_data import IGNORE_INDEX, collate
from compressor.finetune_packing import collate_packed
from compressor.training.stability import clip_gradients

if TYPE_CHECKING:
    from compressor.finetune import FinetuneSummary


class EpochShuffle(torch.utils.data.Sampler):
    """A permutation of the examples drawn from seed + epoch (accelerate calls `set_epoch`)."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        yield from torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()


def make_loader(examples, batch_size: int, pad_id: int, seed: int, shuffle: bool = True,
                packed: bool = False) -> torch.utils.data.DataLoader:
    """Training batches (shuffled per epoch), or held-out ones in file order: the same batches at
    every evaluation, however many came before (a resumed run evaluates fewer times).
    `packed`: the items are `PackedSequence`s (--packing), batched without an attention mask."""
    combine = collate_packed if packed else collate
    return torch.utils.data.DataLoader(
        examples,
        batch_size=batch_size,
        sampler=EpochShuffle(len(examples), seed) if shuffle else torch.utils.data.SequentialSampler(examples),
        collate_fn=lambda rows: combine(rows, pad_id),
        # The loader draws a base seed per iteration; from its own generator, not torch's global
        # one, which LoRA dropout uses (a resumed run starts an iteration at another moment).
        generator=torch.Generator().manual_seed(seed),
        drop_last=False,
    )


def steps_per_epoch(micro_batches: int, accumulation: int) -> int:
    return math.ceil(micro_batches / accumulation)


def micro_batch_groups(loader, accumulation: int, start_step: int) -> Iterator[list[dict]]:
    """The micro-batches of every optimizer step from `start_step` (counted from 0) on, epoch after epoch."""
    per_epoch = steps_per_epoch(len(loader), accumulation)
    epoch, within = divmod(start_step, per_epoch)
    while True:
        loader.set_epoch(epoch)
        group: list[dict] = []
        for index, batch in enumerate(loader):
            if index < within * accumulation:
                continue  # used before the interruption
            group.append(batch)
            if len(group) == accumulation:
                yield group
                group = []
        if group:
            yield group
        epoch, within = epoch + 1, 0


def labelled_tokens(batch: dict) -> torch.Tensor:
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def batch_logits(model, batch: dict) -> torch.Tensor:
    """Padded batches carry an attention mask, packed ones position ids and none (see
    compressor.finetune_packing); no KV cache, whose presence turns packed-sequence masking off."""
    inputs = {name: batch[name] for name in ("input_ids", "attention_mask", "position_ids") if name in batch}
    return model(**inputs, use_cache=False).logits


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over the labelled positions (fp32, as transformers computes it)."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="sum")


def accumulate_step(model, group: list[dict], accelerator) -> float:
    """Forward and backward over one step's micro-batches; returns the step's token-mean loss."""
    local = torch.stack([labelled_tokens(batch) for batch in group]).sum().to(accelerator.device, torch.float64)
    tokens = accelerator.reduce(local, reduction="sum").clamp_min(1)
    total = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    for index, batch in enumerate(group):
        # Gradients are averaged across processes only on the last micro-batch.
        last = index == len(group) - 1
        with nullcontext() if last else accelerator.no_sync(model):
            loss_sum = token_loss_sum(batch_logits(model, batch), batch["labels"])
            accelerator.backward(loss_sum * (accelerator.num_processes / tokens.to(loss_sum.dtype)))
        total += loss_sum.detach().to(torch.float64)
    return float(accelerator.reduce(total, reduction="sum") / tokens)


@torch.no_grad()
def mean_loss(model, loader, accelerator) -> float:
    """Token-weighted mean loss over a data loader, gathered across processes."""
    model.eval()
    totals = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    for batch in loader:
        loss_sum = token_loss_sum(batch_logits(model, batch), batch["labels"])
        totals += torch.stack([loss_sum.double(), labelled_tokens(batch).double()]).to(totals.device)
    totals = accelerator.reduce(totals, reduction="sum")
    model.train()
    return float(totals[0] / totals[1].clamp_min(1))


@dataclass(frozen=True)
class StepPlan:
    steps: int
    accumulation: int
    max_grad_norm: float
    log_every: int
    eval_every: int


def run_steps(model, optimizer, scheduler, loader, eval_loader, accelerator, plan: StepPlan, summary: "FinetuneSummary",
              start_step: int, checkpoint: Callable[[int], None], echo: Callable[[str], None]) -> None:
    """Optimizer steps start_step + 1 … plan.steps; the curves go into `summary`, a checkpoint
    is offered after each step (`checkpoint(step)` decides whether it is due)."""
    model.train()
    groups = micro_batch_groups(loader, plan.accumulation, start_step)
    for step in range(start_step + 1, plan.steps + 1):
        loss = accumulate_step(model, next(groups), accelerator)
        summary.grad_norms.append(clip_gradients(model.parameters(), plan.max_grad_norm, accelerator.clip_grad_norm_))
        summary.learning_rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        summary.losses.append(loss)
        if accelerator.is_main_process and plan.log_every and step % plan.log_every == 0:
            echo(f"step {step}/{plan.steps}: loss {loss:.4f}, gradient norm {summary.grad_norms[-1]:.3f}, lr {summary.learning_rates[-1]:.3g}")
        if eval_loader is not None and plan.eval_every and step % plan.eval_every == 0 and step < plan.steps:
            loss_now = mean_loss(model, eval_loader, accelerator)
            summary.eval_curve.append((step, loss_now))
            if accelerator.is_main_process:
                echo(f"step {step}: held-out loss {loss_now:.4f}")
        checkpoint(step)
