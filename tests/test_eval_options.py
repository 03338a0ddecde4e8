"""`compress eval` as an lm-eval user drives it: --limit as a count or a fraction, --num-fewshot,
tasks built once, the output folder never replacing a model; sizes of the sparse and NF4 layouts;
the Pareto frontier with a metric lm-eval could not compute.

lm-eval runs on tiny random models with a handful of documents.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors import safe_open

from compressor.cli import main
from compressor.evaluation import builtin_tasks
from compressor.evaluation.plot import Point, pareto_frontier
from compressor.evaluation.size import measure_checkpoint
from tests.cli_runs import assert_one_line_refusal, run_cli
from tests.tiny_models import build_tiny_checkpoint

EVAL_SLICE = 97  # records in the built-in evaluation slice


def _compress(source: Path, folder: Path, body: str) -> Path:
    recipe = folder / "r.yaml"
    recipe.write_text(f"name: t\ncalibration: {{samples: 4, seq_len: 64}}\nstages:\n  {body}\n")
    out = folder / "out"
    assert main([str(source), "--recipe", str(recipe), "-o", str(out), "-q", "--no-perplexity"]) == 0
    return out


# ---------------------------------------------------------------- --limit and --num-fewshot

@pytest.mark.parametrize("limit", ["0", "-3", "abc", "1.5", "0.0", "nan"])
def test_bad_limit_is_one_line_and_writes_nothing(tiny_llama, tmp_path, capsys, limit):
    out = tmp_path / "out"
    code, err = run_cli(["eval", f"a={tiny_llama}", "--tasks", "perplexity", "--limit", limit, "-o", out], capsys)
    assert_one_line_refusal(code, err, "--limit", f"got '{limit}'", "fraction between 0 and 1")
    assert list(tmp_path.iterdir()) == []


def test_fractional_limit_and_few_shot_reach_lm_eval_and_the_cache_key(tiny_llama, tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["eval", f"m={tiny_llama}", "--tasks", "abstracts_match", "--limit", "0.03", "--num-fewshot", "1", "-o", str(out), "-q"]
    assert main(argv) == 0
    raw = json.loads((out / "lm_eval_results" / "m.json").read_text())
    assert raw["n-samples"]["abstracts_match"]["effective"] == math.ceil(EVAL_SLICE * 0.03) == 3
    assert raw["n-shot"]["abstracts_match"] == 1 and raw["configs"]["abstracts_match"]["num_fewshot"] == 1
    assert raw["config"]["limit"] == 0.03 and raw["config"]["batch_size"] == 8  # lm-eval's own record of the run
    report = json.loads((out / "report.json").read_text())
    assert report["limit"] == 0.03 and report["num_fewshot"] == 1
    assert "limit 0.03 per task, 1-shot" in (out / "report.md").read_text()
    assert "m: running abstracts_match (limit 0.03, 1-shot, backend hf)" in capsys.readouterr().out

    # Zero-shot is another experiment: the 1-shot numbers in the cache must not be served for it.
    assert main(argv[:6] + ["-o", str(tmp_path / "zero"), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "from the results cache" not in printed and "m: running abstracts_match" in printed
    assert json.loads((tmp_path / "zero" / "lm_eval_results" / "m.json").read_text())["n-shot"]["abstracts_match"] == 0


def test_negative_few_shot_is_refused(tiny_llama, tmp_path, capsys):
    code, err = run_cli(["eval", f"a={tiny_llama}", "--tasks", "perplexity", "--num-fewshot", "-1", "-o", tmp_path / "o"], capsys)
    assert_one_line_refusal(code, err, "--num-fewshot", "got '-1'")


def test_limit_keeps_as_many_windows_as_lm_eval_keeps_examples():
    from compressor.evaluation.perplexity import limited_count

    assert limited_count(97, 0.03) == 3 and limited_count(10, 0.25) == 3
    assert limited_count(10, 4) == 4 and limited_count(10, 20) == 10


def test_recipe_evaluate_takes_a_fraction_and_few_shot_and_refuses_bad_values():
    from compressor.errors import RecipeError
    from compressor.recipe import parse_recipe_text

    text = "name: x\nstages:\n  - quantize: {method: rtn}\nevaluate:\n  tasks: [perplexity]\n  %s\n"
    spec = parse_recipe_text(text % "limit: 0.25\n  num_fewshot: 2", source="r.yaml").evaluate
    assert spec.limit == 0.25 and spec.num_fewshot == 2
    assert parse_recipe_text(text % "limit: 20", source="r.yaml").evaluate.limit == 20
    for bad, key in (("limit: 1.5", "evaluate.limit"), ("limit: 0", "evaluate.limit"), ("num_fewshot: -1", "evaluate.num_fewshot")):
        with pytest.raises(RecipeError) as info:
            parse_recipe_text(text % bad, source="r.yaml")
        assert info.value.format().startswith(f"r.yaml:6 {key}:"), info.value.format()


def test_the_first_metric_is_the_tasks_first_whether_fresh_or_cached(tiny_llama, tmp_path, capsys):
    """The summary column and the plot take each task's first metric: a base served from the
    cache (saved with sorted keys) used to put bits_per_byte first instead of word_perplexity."""
    argv = ["eval", f"base={tiny_llama}", "--tasks", "perplexity", "--limit", "1", "-q"]
    for out in ("fresh", "cached"):
        assert main(argv + ["-o", str(tmp_path / out)]) == 0
    assert "base: perplexity from the results cache" in capsys.readouterr().out
    for out in ("fresh", "cached"):
        metrics = json.loads((tmp_path / out / "report.json").read_text())["models"][0]["metrics"]["perplexity"]
        assert list(metrics) == ["word_perplexity", "byte_perplexity", "bits_per_byte"], out
        assert "| perplexity: word_perplexity |" in (tmp_path / out / "report.md").read_text()


# ---------------------------------------------------------------- tasks built once

def test_each_task_reads_its_data_once(tiny_llama, tmp_path, monkeypatch):
    """The check that a task's data loads is the build lm-eval then scores: one read, not two."""
    calls = []
    rows = builtin_tasks.perplexity_rows
    monkeypatch.setattr(builtin_tasks, "perplexity_rows", lambda: calls.append(1) or rows())
    assert main(["eval", f"m={tiny_llama}", "--tasks", "perplexity", "--limit", "1", "-o", str(tmp_path / "r"), "-q", "--no-cache"]) == 0
    assert len(calls) == 1


def _parity_task(folder: Path, name: str, extra: str = "") -> None:
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps({"q": f"Is {i} even?", "label": int(i % 2 == 1)}) + "\n" for i in range(4)))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n{extra}dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        'output_type: multiple_choice\ntest_split: test\ndoc_to_text: "{{q}}"\ndoc_to_choice: ["yes", "no"]\n'
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )


def test_a_tag_reports_the_tasks_it_names_fresh_and_from_the_cache(tiny_llama, tmp_path, capsys):
    """lm-eval's results name a tag's tasks, never the tag: the report used to come out empty."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name in ("even_a", "even_b"):
        _parity_task(tasks, name, "tag: evens\n")
    argv = ["eval", f"m={tiny_llama}", "--tasks", "evens,perplexity", "--include-path", str(tasks), "--limit", "2", "-q"]
    assert main(argv + ["-o", str(tmp_path / "r")]) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    raw = json.loads((tmp_path / "r" / "lm_eval_results" / "m.json").read_text())
    metrics = report["models"][0]["metrics"]
    assert set(metrics) == {"even_a", "even_b", "perplexity"}
    assert metrics["even_b"]["acc"]["value"] == raw["results"]["even_b"]["acc,none"]
    assert main(argv + ["-o", str(tmp_path / "again")]) == 0
    assert "m: evens, perplexity from the results cache" in capsys.readouterr().out
    assert json.loads((tmp_path / "again" / "report.json").read_text())["models"][0]["metrics"] == metrics


def _count_loads(monkeypatch) -> list[str]:
    from compressor.evaluation import loading

    loads: list[str] = []
    load_named = loading.load_named
    monkeypatch.setattr(loading, "load_named", lambda name, reference, **kw: loads.append(name) or load_named(name, reference, **kw))
    return loads


def test_a_task_whose_data_is_missing_is_refused_before_any_model_loads(tiny_llama, tmp_path, capsys, monkeypatch):
    loads = _count_loads(monkeypatch)
    code, err = run_cli(["eval", f"a={tiny_llama}", "--tasks", "arc_easy", "--limit", "1", "-o", tmp_path / "o", "-q"], capsys)
    assert_one_line_refusal(code, err, "--tasks: task 'arc_easy' cannot load its data")
    assert loads == [] and list(tmp_path.iterdir()) == []


def test_a_hub_model_missing_from_the_offline_cache_is_refused_before_any_work(tiny_llama, tmp_path, capsys, monkeypatch):
    loads = _count_loads(monkeypatch)
    code, err = run_cli(["eval", f"a={tiny_llama}", "b=some-org/not-cached", "--tasks", "perplexity", "-o", tmp_path / "o"], capsys)
    assert_one_line_refusal(code, err, "some-org/not-cached", "model 'b' is not in the local Hub cache", "offline")
    assert loads == [] and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the output folder

@pytest.mark.parametrize("where", ["model", "parent"])
def test_output_folder_that_is_or_holds_a_model_is_refused(tiny_llama, tmp_path, capsys, where):
    """With --overwrite the report replaces OUT whole: that must never delete a model it evaluates."""
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    for path in tiny_llama.iterdir():
        (model / path.name).write_bytes(path.read_bytes())
    out = model if where == "model" else model.parent
    before = sorted(p.name for p in model.iterdir())
    code, err = run_cli(["eval", f"m={model}", "--tasks", "perplexity", "--limit", "1", "-o", out, "--overwrite"], capsys)
    assert_one_line_refusal(code, err, "--output", "would replace model 'm'")
    assert sorted(p.name for p in model.iterdir()) == before


# ---------------------------------------------------------------- size of other layouts

def test_sparse_bitmask_size_counts_values_and_bitmask(tiny_llama, tmp_path):
    base = measure_checkpoint(tiny_llama)
    sparse = measure_checkpoint(_compress(tiny_llama, tmp_path, '- prune: {method: magnitude, sparsity: "2:4", ignore: [lm_head]}'))
    assert sparse.compressed_layers == 14 and sparse.parameters == base.parameters
    assert sparse.bits_per_weight == pytest.approx(16 / 2 + 1)  # half the weights in bf16, one mask bit each


def test_nf4_size_counts_the_packed_codes_and_block_state(tiny_tokenizer_dir, tmp_path):
    source = build_tiny_checkpoint(tmp_path / "qwen3", "qwen3", tiny_tokenizer_dir)  # every Linear in whole NF4 blocks
    base = measure_checkpoint(source)
    out = _compress(source, tmp_path, "- quantize: {method: nf4, double_quant: true, ignore: [lm_head]}")
    nf4 = measure_checkpoint(out)
    assert nf4.compressed_layers == 14 and nf4.parameters == base.parameters
    stored = weights = 0
    with safe_open(str(source / "model.safetensors"), "pt") as dense, safe_open(str(out / "model.safetensors"), "pt") as packed:
        layers = [k.removesuffix(".weight") for k in dense.keys() if ".layers." in k and k.endswith("proj.weight")]
        for layer in layers:
            weights += dense.get_slice(f"{layer}.weight").get_shape()[0] * dense.get_slice(f"{layer}.weight").get_shape()[1]
            for key in packed.keys():
                if key == f"{layer}.weight" or key.startswith(f"{layer}.weight."):
                    tensor = packed.get_tensor(key)
                    stored += 8 * tensor.numel() * tensor.element_size()
    assert len(layers) == 14
    assert nf4.bits_per_weight == pytest.approx(stored / weights)
    assert 4 < nf4.bits_per_weight < 8  # 4-bit codes plus block state; it was 8.0 (the uint8 storage width)


# ---------------------------------------------------------------- the frontier

def test_a_metric_lm_eval_could_not_compute_is_not_on_the_frontier():
    points = [Point("broken", 10, math.nan), Point("a", 20, 8.0), Point("b", 30, 7.0), Point("c", 30, 9.0)]
    assert [p.label for p in pareto_frontier(points, higher_is_better=False)] == ["a", "b"]
    assert [p.label for p in pareto_frontier(points, higher_is_better=True)] == ["a", "c"]
