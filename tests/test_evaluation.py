"""Evaluation: built-in tasks, size accounting, recovery, Pareto frontier, plot, report, cache.

lm-eval runs here on tiny random models (a few documents each); the SmolLM2 run is in
test_eval_integration.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import pytest
from safetensors import safe_open

from compressor.cli import main
from compressor.evaluation.builtin_tasks import match_rows, perplexity_rows
from compressor.evaluation.catalog import TaskCatalog
from compressor.evaluation.lm_eval_index import scan_lm_eval_index
from compressor.evaluation.plot import Panel, Point, accuracy_vs_size_figure, pareto_frontier, write_accuracy_vs_size
from compressor.evaluation.report import ModelRow, build_report, recovery, write_report
from compressor.evaluation.runner import Metric
from compressor.evaluation.size import SizeInfo, measure_checkpoint

RTN_RECIPE = """\
name: tiny-w4
calibration: {samples: 4, seq_len: 64}
stages:
  - quantize: {method: rtn, weights: {bits: 4, group_size: 32}, ignore: [lm_head]}
"""


@pytest.fixture(scope="module")
def tiny_w4(tiny_llama, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-w4")
    recipe = folder / "rtn.yaml"
    recipe.write_text(RTN_RECIPE)
    out = folder / "out"
    assert main([str(tiny_llama), "--recipe", str(recipe), "-o", str(out), "-q", "--no-perplexity"]) == 0
    return out


# ---------------------------------------------------------------- built-in tasks

def test_match_questions_are_deterministic_and_well_formed():
    rows = match_rows(seed=0)
    assert rows == match_rows(seed=0)
    assert rows != match_rows(seed=1)
    assert len(rows) == 97
    for row in rows:
        assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4
        assert row["choices"][row["label"]] == row["title"]
    # the right answer is not always in one position
    assert len({row["label"] for row in rows}) == 4


def test_builtin_tasks_never_read_the_calibration_slice():
    from compressor.calibration.corpus import calibration_slice_path

    calibration = [json.loads(line) for line in calibration_slice_path().read_text().splitlines() if line]
    calibration_titles = {r["title"] for r in calibration}
    assert not calibration_titles & {r["title"] for r in perplexity_rows()}
    assert not calibration_titles & {c for r in match_rows() for c in r["choices"]}

    def shingles(text: str) -> set[str]:  # every run of 12 words: catches a reworded or re-titled copy
        words = text.split()
        return {" ".join(words[i:i + 12]) for i in range(len(words) - 11)}

    seen = set().union(*(shingles(r["abstract"]) for r in calibration))
    assert not any(shingles(r["text"]) & seen for r in perplexity_rows())
    assert not any(shingles(r["abstract"]) & seen for r in match_rows())


# ---------------------------------------------------------------- task names

def test_scan_finds_quoted_listed_and_templated_names(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.yaml").write_text('"task": "quoted_task"\ntag: [t1, t2]\n')
    (tmp_path / "a" / "_template").write_text("tag:\n    - block_tag\ndataset_path: x\n")
    (tmp_path / "a" / "two.yaml").write_text("include: _template\ntask: templated  # a comment\n")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "group.yaml").write_text("group: my_group\ntask:\n  - member_defined_elsewhere\n")
    found = {name: entry.folder for name, entry in scan_lm_eval_index(tmp_path).items()}
    assert found == {"quoted_task": "a", "t1": "a", "t2": "a", "templated": "a", "block_tag": "a", "my_group": "b"}


def test_lm_eval_tasks_resolve_without_the_full_index():
    catalog = TaskCatalog()
    (arc,) = catalog.resolve(["arc_easy"])
    assert arc.source == "lm-eval" and arc.lm_eval_folders == ("arc",)
    manager = catalog.task_manager([arc])
    assert "arc_easy" in manager.task_index and "perplexity" in manager.task_index
    assert "hellaswag" not in manager.task_index  # only the folders asked for were indexed


# ---------------------------------------------------------------- size

def test_size_accounting_reads_the_packed_tensors(tiny_llama, tiny_w4):
    from transformers import AutoModelForCausalLM

    base = measure_checkpoint(tiny_llama)
    w4 = measure_checkpoint(tiny_w4)
    assert base.bits_per_weight == 16.0 and base.compressed_layers == 0
    assert base.parameters == AutoModelForCausalLM.from_pretrained(str(tiny_llama)).num_parameters()
    assert w4.parameters == base.parameters
    assert w4.compressed_layers == 14

    stored = represented = 0
    with safe_open(str(tiny_w4 / "model.safetensors"), framework="pt") as handle:
        for key in handle.keys():
            if key.endswith(".weight_packed"):
                prefix = key.removesuffix(".weight_packed")
                shape = handle.get_tensor(prefix + ".weight_shape").tolist()
                represented += shape[0] * shape[1]
                for leaf in ("weight_packed", "weight_scale"):
                    t = handle.get_tensor(f"{prefix}.{leaf}")
                    stored += t.numel() * t.element_size() * 8
    assert w4.bits_per_weight == pytest.approx(stored / represented)
    assert w4.bits_per_weight == pytest.approx(4 + 16 / 32)  # int4 plus one bf16 scale per 32 weights
    assert w4.size_bytes == (tiny_w4 / "model.safetensors").stat().st_size


# ---------------------------------------------------------------- recovery, frontier, plot

def test_recovery_is_direction_aware():
    assert recovery(0.45, 0.5, True) == pytest.approx(0.9)
    assert recovery(10.0, 8.0, False) == pytest.approx(0.8)  # perplexity up 25 %: 80 % recovered
    assert recovery(6.0, 8.0, False) == pytest.approx(8 / 6)
    assert recovery(0.5, 0.5, None) is None
    assert recovery(0.5, 0.0, True) is None and recovery(math.inf, 8.0, False) is None


POINTS = [Point("a", 100, 0.5), Point("b", 50, 0.5), Point("c", 50, 0.4), Point("d", 200, 0.7), Point("e", 150, 0.6), Point("f", 300, 0.65)]


def test_pareto_frontier_on_hand_built_points():
    assert [p.label for p in pareto_frontier(POINTS, higher_is_better=True)] == ["b", "e", "d"]
    # lower is better: the smallest score wins at each size
    assert [p.label for p in pareto_frontier(POINTS, higher_is_better=False)] == ["c"]
    tie = [Point("x", 10, 1.0), Point("y", 10, 1.0)]
    assert [p.label for p in pareto_frontier(tie, True)] == ["x", "y"]


def test_plot_is_a_png_with_every_point_and_the_frontier(tmp_path):
    panels = [Panel("t1: acc", True, POINTS), Panel("t2: word_perplexity", False, POINTS[:4])]
    path = tmp_path / "plot.png"
    figure = write_accuracy_vs_size(panels, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(str(path)).shape
    assert width > height > 100
    visible = [ax for ax in figure.axes if ax.get_visible()]
    assert len(visible) == 2
    for ax, panel, frontier_size in zip(visible, panels, (3, 1)):
        (models,) = [c for c in ax.collections if c.get_gid() == "models"]
        assert len(models.get_offsets()) == len(panel.points)
        (line,) = [l for l in ax.lines if l.get_gid() == "pareto"]
        assert len(line.get_xdata()) == frontier_size
        assert "Pareto frontier" in [t.get_text() for t in ax.get_legend().get_texts()]
        assert {t.get_text() for t in ax.texts} == {p.label for p in panel.points}
    assert accuracy_vs_size_figure([]).axes  # nothing to plot still gives a picture


def test_report_files_from_hand_built_rows(tmp_path):
    size = SizeInfo(1000, 16.0, 10, 0)
    rows = [
        ModelRow("base", "ref/base", "hf", size, {"t": {"acc": Metric(0.5, 0.05, True), "ppl": Metric(8.0, None, False)}}),
        ModelRow("small", "ref/small", "hf", SizeInfo(400, 4.5, 10, 3), {"t": {"acc": Metric(0.4, 0.05, True), "ppl": Metric(10.0, None, False)}}),
    ]
    report = build_report(rows, "base", ["t"], 5, "0.4.13")
    write_report(tmp_path, report, {"base": {"results": {}}, "small": {"results": {}}})
    assert {p.name for p in tmp_path.iterdir()} == {"report.json", "report.md", "report.html", "accuracy_vs_size.png", "lm_eval_results"}
    saved = json.loads((tmp_path / "report.json").read_text())
    small = saved["models"][1]["metrics"]["t"]
    assert small["acc"]["recovery"] == pytest.approx(0.8) and small["ppl"]["recovery"] == pytest.approx(0.8)
    assert saved["models"][0]["metrics"]["t"]["acc"]["recovery"] == 1.0
    assert "| small | hf | 0.0 MB | 4.50 |" in (tmp_path / "report.md").read_text()
    assert "0.4 ± 0.05 (80.0 %)" in (tmp_path / "report.md").read_text()
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64,iVBORw0KGgo" in html and "<td>small</td>" in html


# ---------------------------------------------------------------- compress eval, end to end on tiny models

def _metrics_from_lm_eval(raw: dict, task: str) -> dict[str, tuple[float, float | None]]:
    row = raw["results"][task]
    out = {}
    for key, value in row.items():
        if "," in key and "_stderr," not in key:
            metric = key.split(",")[0]
            stderr = row[f"{metric}_stderr,none"]
            out[metric] = (value, None if stderr == "N/A" else stderr)
    return out


def test_compress_eval_report_numbers_equal_lm_eval_json(tiny_llama, tiny_w4, tmp_path, capsys, monkeypatch):
    # Its own results cache: the first run must compute the base (another file on the same xdist
    # worker may already have cached the base's perplexity in the session's cache).
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "report"
    argv = ["eval", f"base={tiny_llama}", f"w4={tiny_w4}", "--tasks", "perplexity,abstracts_match", "--limit", "3", "-o", str(out), "-q"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["schema"] == 1 and report["base"] == "base" and report["limit"] == 3
    assert report["tasks"] == ["perplexity", "abstracts_match"]
    for model in report["models"]:
        raw = json.loads((out / "lm_eval_results" / f"{model['name']}.json").read_text())
        assert raw["n-samples"]["perplexity"]["effective"] == 3
        for task in report["tasks"]:
            expected = _metrics_from_lm_eval(raw, task)
            assert set(model["metrics"][task]) == set(expected)
            for metric, (value, stderr) in expected.items():
                assert model["metrics"][task][metric]["value"] == value
                assert model["metrics"][task][metric]["stderr"] == stderr
                assert model["metrics"][task][metric]["higher_is_better"] == raw["higher_is_better"][task][metric]
    base, w4 = report["models"]
    assert base["tokens_per_second"] > 0 and w4["tokens_per_second"] > 0
    assert base["bits_per_weight"] == 16.0 and w4["bits_per_weight"] == pytest.approx(4.5)
    assert w4["size_bytes"] < base["size_bytes"] and w4["parameters"] == base["parameters"]
    ppl = w4["metrics"]["perplexity"]["word_perplexity"]
    assert ppl["recovery"] == pytest.approx(base["metrics"]["perplexity"]["word_perplexity"]["value"] / ppl["value"])
    assert ppl["value"] != base["metrics"]["perplexity"]["word_perplexity"]["value"]  # fp32 log-softmax sees 4-bit error
    printed = capsys.readouterr().out
    assert "| w4 | hf |" in printed and "report:" in printed

    # Second run: the base comes from the results cache, with the very same numbers.
    again = tmp_path / "again"
    assert main(argv[:-3] + ["-o", str(again), "-q"]) == 0
    assert "base: perplexity, abstracts_match from the results cache" in capsys.readouterr().out
    cached = json.loads((again / "report.json").read_text())
    assert cached["models"][0]["metrics"] == base["metrics"] and cached["models"][0]["cached_tasks"] == report["tasks"]
    assert cached["models"][0]["tokens_per_second"] is None  # nothing ran, nothing measured
    # Its results JSON keeps the header of the run that made the numbers, and says they were cached.
    fresh_raw = json.loads((out / "lm_eval_results" / "base.json").read_text())
    cached_raw = json.loads((again / "lm_eval_results" / "base.json").read_text())
    assert cached_raw["config"] == fresh_raw["config"] and cached_raw["date"] == fresh_raw["date"]
    assert cached_raw["compressor_cached_tasks"] == report["tasks"] and "compressor_cached_tasks" not in fresh_raw


def test_include_path_task_over_local_json_runs_offline(tiny_llama, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"q": f"Is {i} even?", "label": int(i % 2 == 1)}) + "\n" for i in range(6)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "parity.yaml").write_text(
        "task: parity\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\noutput_type: multiple_choice\ntest_split: test\n"
        'doc_to_text: "{{q}}"\ndoc_to_choice: ["yes", "no"]\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n"
    )
    out = tmp_path / "r"
    assert main(["eval", f"m={tiny_llama}", "--tasks", "parity", "--include-path", str(tasks), "-o", str(out), "-q"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert 0 <= report["models"][0]["metrics"]["parity"]["acc"]["value"] <= 1
    raw = json.loads((out / "lm_eval_results" / "m.json").read_text())
    assert raw["n-samples"]["parity"]["effective"] == 6


# ---------------------------------------------------------------- bad input: exit 2, nothing written

def _bad(argv, tmp_path, capsys) -> str:
    out = tmp_path / "out"
    try:
        code = main(["eval", *argv, "-o", str(out)])
    except SystemExit as exit_:  # argparse refuses a flag's value itself
        code = exit_.code
    assert code == 2
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


def test_unknown_task_lists_close_names(tiny_llama, tmp_path, capsys):
    err = _bad([f"a={tiny_llama}", "--tasks", "perplexty"], tmp_path, capsys)
    assert "unknown task 'perplexty'; did you mean perplexity" in err


def test_duplicate_model_names_are_refused(tiny_llama, tmp_path, capsys):
    err = _bad([f"a={tiny_llama}", f"a={tiny_llama}", "--tasks", "perplexity"], tmp_path, capsys)
    assert "two models are named 'a'" in err


def test_malformed_include_yaml_names_file_and_line(tiny_llama, tmp_path, capsys):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "broken.yaml").write_text("task: broken\noutput_type: multiple_choice\nmetric_list: [\n  - metric: acc\n")
    err = _bad([f"a={tiny_llama}", "--tasks", "broken", "--include-path", str(tasks)], tmp_path, capsys)
    assert f"{tasks / 'broken.yaml'}:" in err and "malformed task YAML" in err
    line = int(err.split("broken.yaml:")[1].split(":")[0].split()[0])
    assert line in (4, 5)


def test_task_whose_dataset_cannot_be_read_is_one_line(tiny_llama, tmp_path, capsys):
    """arc_easy's data lives on the Hub; offline (HF_HUB_OFFLINE=1) and uncached it cannot load."""
    err = _bad([f"a={tiny_llama}", "--tasks", "arc_easy", "--limit", "1", "-q"], tmp_path, capsys)
    assert "--tasks: task 'arc_easy' cannot load its data: ConnectionError" in err


def test_recipe_task_whose_dataset_cannot_be_read_names_the_recipe_key(tiny_llama, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\ncalibration: {samples: 4, seq_len: 32}\nstages:\n  - quantize: {method: rtn, weights: {bits: 4, group_size: 32}}\n"
                      "evaluate:\n  tasks: [arc_easy]\n  limit: 1\n")
    out = tmp_path / "out"
    assert main([str(tiny_llama), "--recipe", str(recipe), "-o", str(out), "-q", "--no-perplexity"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith(f"error: {recipe}:6 evaluate.tasks: task 'arc_easy' cannot load its data"), err
    assert not out.exists()


def test_model_that_fails_to_load_is_named(tiny_llama, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_llama / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    err = _bad([f"bad={broken}", f"good={tiny_llama}", "--tasks", "perplexity", "--limit", "1", "-q"], tmp_path, capsys)
    assert "model 'bad' failed to load" in err


def test_missing_model_path_is_named_before_any_work(tiny_llama, tmp_path, capsys):
    err = _bad([f"good={tiny_llama}", f"gone={tmp_path / 'nope'}", "--tasks", "perplexity"], tmp_path, capsys)
    assert "model 'gone'" in err


def test_vllm_backend_without_vllm_is_one_line(tiny_llama, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed")
    err = _bad([f"a={tiny_llama}", "--tasks", "perplexity", "--backend", "vllm"], tmp_path, capsys)
    assert "--backend vllm needs vLLM" in err


# ---------------------------------------------------------------- recipe evaluate block

def test_recipe_evaluate_writes_report_and_caches_the_base(tiny_llama, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RTN_RECIPE.replace("tiny-w4", "tiny-w4-eval") + "evaluate: {tasks: [perplexity, abstracts_match], limit: 2}\n")
    out = tmp_path / "o"
    assert main([str(tiny_llama), "--recipe", str(recipe), "-o", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "held-out perplexity" in printed and f"evaluation report: {out / 'eval' / 'report.md'}" in printed
    report = json.loads((out / "eval" / "report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["base", "tiny-w4-eval"]
    assert report["models"][1]["bits_per_weight"] == pytest.approx(4.5)
    assert (out / "eval" / "accuracy_vs_size.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "eval" / "lm_eval_results" / "tiny-w4-eval.json").is_file()

    assert main([str(tiny_llama), "--recipe", str(recipe), "-o", str(tmp_path / "o2"), "-q"]) == 0
    assert "base: perplexity, abstracts_match from the results cache" in capsys.readouterr().out
    second = json.loads((tmp_path / "o2" / "eval" / "report.json").read_text())
    assert second["models"][0]["metrics"] == report["models"][0]["metrics"]


def test_recipe_accepts_lm_eval_and_builtin_task_names_at_parse_time():
    from compressor.errors import RecipeError
    from compressor.recipe import parse_recipe_text

    text = "name: x\nstages:\n  - quantize: {method: rtn}\nevaluate:\n  tasks: [%s]\n  limit: 5\n"
    recipe = parse_recipe_text(text % "perplexity, abstracts_match, arc_easy, mmlu", source="r.yaml")
    assert recipe.evaluate.tasks == ["perplexity", "abstracts_match", "arc_easy", "mmlu"]
    with pytest.raises(RecipeError) as info:
        parse_recipe_text(text % "abstracts_mtch", source="r.yaml")
    assert info.value.format().startswith("r.yaml:5 evaluate.tasks: unknown task 'abstracts_mtch'; did you mean abstracts_match")


def test_results_slices_per_task_round_trip_and_groups_expand():
    from compressor.evaluation.runner import extract_metrics, merge_slices, task_slice

    row = lambda acc: {"alias": "x", "acc,none": acc, "acc_stderr,none": 0.1}  # noqa: E731
    results = {
        "results": {"a": row(0.5), "b": row(0.7), "c": row(0.2)},
        "higher_is_better": {"a": {"acc": True}, "b": {"acc": True}, "c": {"acc": True}},
        "group_subtasks": {"g": ["a", "b"]},
        "groups": {"g": {"acc,none": 0.6}},
        "versions": {"a": 1, "b": 1, "c": 2},
        "n-samples": {"a": {"effective": 3}, "b": {"effective": 3}, "c": {"effective": 3}},
        "configs": {}, "n-shot": {},
    }
    group = task_slice(results, "g")
    assert set(group["results"]) == {"a", "b"} and group["group_subtasks"] == {"g": ["a", "b"]}
    merged = merge_slices([group, task_slice(results, "c")], {"lm_eval_version": "0.4.13"})
    for section in ("results", "groups", "higher_is_better", "group_subtasks", "versions", "n-samples"):
        assert merged[section] == results[section]
    # a group without its own row reports its tasks' rows
    metrics = extract_metrics(merged, ["g", "c"])
    assert set(metrics) == {"a", "b", "c"}
    assert metrics["b"]["acc"] == Metric(0.7, 0.1, True)
