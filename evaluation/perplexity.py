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


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    tokens: int
    windows: int


def evaluation_windows(tokenizer, seq_len: int) -> torch.Tensor:
    stream: list[int] = []
    for document in read_abstracts(evaluation_slice_path()):
        stream.extend(tokenizer(document, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
    windows = len(stream) // seq_len
    return torch.tensor(stream[: windows * seq_len], dtype=torch.int64).reshape(windows, seq_len)


@torch.no_grad()
def perplexity_on(model, windows: torch.Tensor, batch_size: int = 4) -> PerplexityResult:
    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        total_nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        total_tokens += targets.numel()
    return PerplexityResult(math.exp(total_nll / total_tokens), total_tokens, windows.shape[0])


def heldout_perplexity(model, tokenizer, seq_len: int = 512) -> PerplexityResult:
    return perplexity_on(model, evaluation_windows(tokenizer, seq_len))
