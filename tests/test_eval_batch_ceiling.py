"""`--batch-size auto` on the CPU: lm-eval's search starts from a batch whose logits over the
model's whole context fit in memory, not from its GPU-minded 64 (on SmolLM2, 64 × 8192 × 49,152
logits: about 100 GB), unless --max-batch-size says otherwise."""

from __future__ import annotations

import json
import shutil

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


# ---------------------------------------------------------------- what report.json and report.md record

def _tiny_ceiling(monkeypatch, rows: int) -> None:
    """Memory for `rows` rows of the tiny model's logits (256 positions × 384 tokens), twice over."""
    monkeypatch.setattr(batch_ceiling, "available_memory", lambda: 2 * rows * 256 * 384 * LOGIT_BYTES + 1)


def _report(out) -> tuple[dict, str]:
    return json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


@pytest.mark.parametrize(
    "flags, value, source, words",
    [
        (["--batch-size", "auto"], 3, "cpu_memory_ceiling", "batch size auto (searched from 3, the CPU memory ceiling)"),
        (["--batch-size", "auto", "--max-batch-size", "5"], 5, "flag", "batch size auto (searched from 5, --max-batch-size)"),
        (["--batch-size", "2"], None, None, "batch size 2;"),
        (["--batch-size", "2", "--max-batch-size", "5"], None, None, "batch size 2;"),  # nothing searched
    ],
    ids=["cpu-ceiling", "flag", "fixed", "fixed-with-ceiling"],
)
def test_the_report_records_the_ceiling_the_search_used_and_where_it_came_from(tiny_llama, tmp_path, monkeypatch, flags, value, source, words):
    _tiny_ceiling(monkeypatch, 3)
    out = tmp_path / "r"
    assert main(["eval", f"m={tiny_llama}", "--tasks", "abstracts_match", "--limit", "2", "--no-cache", "-q", *flags, "-o", str(out)]) == 0
    report, markdown = _report(out)
    assert (report["settings"]["max_batch_size"], report["settings"]["max_batch_size_source"]) == (value, source)
    model = report["models"][0]
    assert (model["max_batch_size"], model["max_batch_size_source"]) == (value, source)
    assert words in markdown
    if source is None:
        assert "searched from" not in markdown


def test_a_recipe_ceiling_is_named_as_the_recipe_s(tiny_llama, tmp_path, monkeypatch):
    _tiny_ceiling(monkeypatch, 3)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: t\ncalibration: {samples: 2, seq_len: 32}\nstages:\n  - prune: {method: magnitude, sparsity: 0.5, ignore: [lm_head]}\n"
        "evaluate:\n  tasks: [abstracts_match]\n  limit: 2\n  batch_size: auto\n  max_batch_size: 4\n"
    )
    assert main([str(tiny_llama), "--recipe", str(recipe), "-o", str(tmp_path / "out"), "-q", "--no-perplexity"]) == 0
    report, markdown = _report(tmp_path / "out" / "eval")
    assert (report["settings"]["max_batch_size"], report["settings"]["max_batch_size_source"]) == (4, "recipe")
    assert "searched from 4, the recipe's max_batch_size" in markdown


def test_the_ceiling_is_not_part_of_the_results_cache_key(tiny_llama, tmp_path, monkeypatch, capsys):
    argv = ["eval", f"m={tiny_llama}", "--tasks", "abstracts_match", "--limit", "2", "-q", "--batch-size", "auto"]
    _tiny_ceiling(monkeypatch, 3)
    assert main(argv + ["-o", str(tmp_path / "first")]) == 0
    first, _ = _report(tmp_path / "first")
    _tiny_ceiling(monkeypatch, 1)  # another ceiling: the same scores, so the cached ones are served
    capsys.readouterr()
    assert main(argv + ["-o", str(tmp_path / "again")]) == 0
    assert "m: abstracts_match from the results cache" in capsys.readouterr().out
    again, markdown = _report(tmp_path / "again")
    assert again["models"][0]["metrics"] == first["models"][0]["metrics"]
    # nothing was searched in the second run, and the user set no ceiling
    assert (again["settings"]["max_batch_size"], again["settings"]["max_batch_size_source"]) == (None, None)
    assert again["models"][0]["max_batch_size"] is None and "searched from" not in markdown


def test_models_with_different_ceilings_are_recorded_per_model(tiny_llama, tmp_path, monkeypatch):
    short = tmp_path / "short"  # the same model with half the context: twice as many rows fit
    shutil.copytree(tiny_llama, short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 128}))
    _tiny_ceiling(monkeypatch, 3)
    out = tmp_path / "r"
    argv = ["eval", f"a={tiny_llama}", f"b={short}", "--tasks", "abstracts_match", "--limit", "2", "--no-cache", "-q",
            "--batch-size", "auto", "-o", str(out)]
    assert main(argv) == 0
    report, markdown = _report(out)
    assert {m["name"]: (m["max_batch_size"], m["max_batch_size_source"]) for m in report["models"]} == {
        "a": (3, "cpu_memory_ceiling"), "b": (6, "cpu_memory_ceiling"),
    }
    assert report["settings"]["max_batch_size_source"] == "per model" and report["settings"]["max_batch_size"] is None
    assert "searched from a ceiling per model" in markdown
