"""Held-out perplexity: the chunked float32 loss equals a direct computation over whole batches."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from compressor.evaluation.perplexity import perplexity_on


def test_chunked_perplexity_equals_the_direct_computation(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    windows = torch.randint(3, 380, (3, 200), generator=torch.Generator().manual_seed(0))  # 199 targets: 2 chunks
    with torch.no_grad():
        logits = model(input_ids=windows, use_cache=False).logits[:, :-1].double()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1), reduction="sum")
    expected = math.exp(nll.item() / windows[:, 1:].numel())
    for batch_size in (1, 2):
        result = perplexity_on(model, windows, batch_size=batch_size)
        assert result.tokens == 3 * 199 and result.windows == 3
        assert math.isclose(result.perplexity, expected, rel_tol=1e-4)
