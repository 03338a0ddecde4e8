"""`--batch-size auto` on the CPU: lm-eval's search starts from a batch whose logits over the
model's whole context fit in memory, not from its GPU-minded 64 (on SmolLM2, 64 × 8192 × 49,152
logits: about 100 GB), unless --max-batch-size says otherwise."""

from __future__ import annotations

import json

import pytest

from compressor.cli import main
from compressor.evaluation import batch_ceiling
from compressor.evaluation.batch_ceiling import LOGIT_BYTES, cpu_batch_ceiling

GIB = 2**30


def test_the_ceiling_is_the_batch_whose_logits_fit_in_half_the_available_memory():
    # SmolLM2: one 8192-token row of its 49,152-wide logits takes 4.5 GiB at 12 bytes a logit
    assert cpu_batch_ceiling(8192, 49152, 24 * GIB) == 2
    assert cpu_batch_ceiling(8192, 49152, 16 * GIB) == 1
    assert cpu_batch_ceiling(2048, 32000, 24 * GIB) == 16
    assert cpu_batch_ceiling(256, 384, 24 * GIB) == 64  # lm-eval's own ceiling, never more
    assert cpu_batch_ceiling(8192, 128256, 4 * GIB) == 1  # never below 1


def _batch_sizes(tiny_llama, out, *flags) -> list[int]:
    argv = ["eval", f"m={tiny_llama}", "--tasks", "abstracts_match", "--limit", "4", "--no-cache", "-q",
            "--batch-size", "auto", *flags, "-o", str(out)]
    assert main(argv) == 0
    return json.loads((out / "lm_eval_results" / "m.json").read_text())["config"]["batch_sizes"]


@pytest.mark.parametrize("flags, expected", [([], [3]), (["--max-batch-size", "5"], [5])], ids=["cpu-ceiling", "user-ceiling"])
def test_the_cpu_ceiling_reaches_lm_eval_unless_max_batch_size_is_given(tiny_llama, tmp_path, monkeypatch, flags, expected):
    # Memory for three rows of the tiny model's logits (256 positions × 384 tokens), twice over.
    monkeypatch.setattr(batch_ceiling, "available_memory", lambda: 2 * 3 * 256 * 384 * LOGIT_BYTES + 1)
    assert _batch_sizes(tiny_llama, tmp_path / "r", *flags) == expected  # lm-eval's search found no OOM: its ceiling
