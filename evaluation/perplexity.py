"""Held-out perplexity on the evaluation slice of the built-in corpus.

The evaluation documents are joined with the EOS token, in file order, and cut into
non-overlapping windows of ``seq_len`` tokens (the last partial window is dropped); the
perplexity is exp of the mean next-token negative log-likelihood over every predicted
token. The calibration slice is never read here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from compressor.calibration.corpus import evaluation_slice_path, read_abstracts
from compressor.offload import compute_device


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    tokens: int
    windows: int


def limited_count(total: int, limit: int | float) -> int:
    """How many of `total` items a limit keeps, read as lm-eval reads it (below 1: a fraction, rounded up)."""
    return math.ceil(total * limit) if limit < 1 else min(total, int(limit))


def evaluation_windows(tokenizer, seq_len: int) -> torch.Tensor:
    stream: list[int] = []
    for document in read_abstracts(evaluation_slice_path()):
        stream.extend(tokenizer(document, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
    windows = len(stream) // seq_len
    return torch.tensor(stream[: windows * seq_len], dtype=torch.int64).reshape(windows, seq_len)


# Positions whose logits are upcast to float32 at once. A 512-token window of a 49k vocabulary
# is 100 MB of float32 logits, and the loss needs another copy: upcasting it whole (four
# windows at a time, as this once did) was most of a compress run's peak memory.
_LOSS_ROWS = 128


def _window_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed next-token NLL of one window: logits [L-1, V] (model dtype), targets [L-1]."""
    total = 0.0
    for start in range(0, targets.shape[0], _LOSS_ROWS):
        rows = slice(start, start + _LOSS_ROWS)
        total += F.cross_entropy(logits[rows].float(), targets[rows], reduction="sum").item()
    return total


@torch.no_grad()
def perplexity_on(model, windows: torch.Tensor, batch_size: int = 1) -> PerplexityResult:
    device = compute_device(model)
    total_nll = 0.0
    total_tokens = 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        for row in range(batch.shape[0]):
            total_nll += _window_nll(logits[row, :-1], batch[row, 1:])
        total_tokens += batch[:, 1:].numel()
        del logits
    return PerplexityResult(math.exp(total_nll / total_tokens), total_tokens, windows.shape[0])


def heldout_perplexity(model, tokenizer, seq_len: int = 512) -> PerplexityResult:
    return perplexity_on(model, evaluation_windows(tokenizer, seq_len))
