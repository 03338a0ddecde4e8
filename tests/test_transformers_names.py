"""Our calls into transformers use the names the installed version has, so they print no FutureWarning.

transformers 5.24 renamed `past_key_values` to `cache`; with the old name every calibration block and
every decode step warned on stderr (the CLI's one-line error tests caught it).
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from compressor.decode_speed import time_decode
from compressor.layerwise import _propagate, capture_block_inputs, find_decoder_blocks
from compressor.transformers_names import (
    CACHE_NAMES,
    cache_argument,
    disable_activation_checkpointing,
    enable_activation_checkpointing,
    returned_cache,
)


@pytest.fixture()
def model(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def test_cache_argument_is_a_parameter_of_the_installed_forward(model):
    name = cache_argument(model)
    assert name in CACHE_NAMES
    assert name in inspect.signature(model.forward).parameters
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    cache = returned_cache(out)
    assert cache is not None and cache.get_seq_length() == 3


def test_calibration_capture_and_block_calls_warn_nothing(model):
    _, blocks = find_decoder_blocks(model)
    tokens = torch.randint(0, model.config.vocab_size, (4, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inputs = capture_block_inputs(model, blocks[0], tokens, batch_size=2)
        before = [hidden.clone() for hidden in inputs.hidden]
        _propagate(blocks[0], inputs, torch.device("cpu"))
    assert len(inputs.hidden) == 2
    assert not any(name in kwargs for kwargs in inputs.kwargs for name in CACHE_NAMES)
    assert all(kwargs["use_cache"] is False for kwargs in inputs.kwargs)
    assert not torch.equal(inputs.hidden[0], before[0])  # the block ran on them


def test_cached_decode_warns_nothing_and_matches_a_full_forward(model):
    prompt = torch.tensor([[5, 9, 14, 3]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        timings = time_decode({"tiny": model}, prompt, new_tokens=3, repeats=1)
        name = cache_argument(model)
        with torch.no_grad():
            first = model(input_ids=prompt, use_cache=True)
            token = first.logits[:, -1:].argmax(-1)
            step = model(input_ids=token, **{name: returned_cache(first)}, use_cache=True)
            full = model(input_ids=torch.cat([prompt, token], dim=1), use_cache=False)
    assert timings["tiny"].tokens == 3 and len(timings["tiny"].seconds) == 1
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], rtol=1e-4, atol=1e-4)


def test_activation_checkpointing_switches_on_and_off_without_warnings(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enable_activation_checkpointing(model)
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        disable_activation_checkpointing(model)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
