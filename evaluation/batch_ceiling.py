"""The largest batch `--batch-size auto` tries when the model runs on the CPU.

lm-eval 0.4.13's HFLM finds its batch size by trial (`HFLM._detect_batch_size`): it starts at
`max_batch_size` (its default 64) and, through accelerate's `find_executable_batch_size`, retries
at 0.9 × the size after each out-of-memory error, with five forward passes per size of batch ×
tokens, where tokens is the longest request or, for a rolling-loglikelihood task such as
perplexity, the model's whole context. On a GPU an oversized trial fails at once. On the CPU it
first runs the whole model over that batch, and its logits alone can outgrow the machine:
SmolLM2-135M's first perplexity trial is 64 × 8192 tokens, whose 49,152-wide logits take about
100 GB in fp32 (benchmarks/RESULTS.md). Linux may hand such memory out and then kill the process.

So on the CPU, when the user sets no `--max-batch-size`, the search starts from the largest batch
whose logits over the model's whole context fit in half the memory available now, at least 1 and
at most lm-eval's own 64. A logit costs `LOGIT_BYTES` at a trial's peak: the runner's fp32 copy of
the logits, lm-eval's fp32 log-softmax of it, and the previous trial's log-softmax, which lm-eval
keeps until the new one replaces it (the model's own bf16 logits are freed by then). The other
half of the memory is left for the weights and activations.
"""

from __future__ import annotations

from typing import Any

LOGIT_BYTES = 12
LM_EVAL_MAX_BATCH_SIZE = 64  # HFLM's default `max_batch_size`


def cpu_batch_ceiling(context: int, vocab: int, available_bytes: int) -> int:
    """The batch whose `context` × `vocab` logits fit in half of `available_bytes`, within [1, 64]."""
    per_row = max(1, context * vocab * LOGIT_BYTES)
    return max(1, min(LM_EVAL_MAX_BATCH_SIZE, available_bytes // 2 // per_row))


def available_memory() -> int:
    """The CPU memory available now, as accelerate measures it when it places a model."""
    from accelerate.utils import get_max_memory

    return int(get_max_memory()["cpu"])


def ceiling_for(lm: Any) -> int:
    """`cpu_batch_ceiling` for an lm-eval HFLM: its context (`max_length`, as its trials use it)
    and the width of the model's logits."""
    model = lm.model
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = getattr(head, "out_features", None) or model.config.get_text_config().vocab_size
    return cpu_batch_ceiling(int(lm.max_length), int(vocab), available_memory())
