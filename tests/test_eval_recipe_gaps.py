"""A recipe's `evaluate:` block where it used to fall short of `compress eval`: lm-eval's saved
results naming a merge's deleted temporary folder, and a task that runs model-written code
refused only once the base model had loaded."""

from __future__ import annotations

import json
import shutil

import pytest

from compressor.cli import main
from tests.cli_runs import assert_one_line_refusal, compress_into, run_cli
from tests.merge_fixtures import perturbed_copy

MERGE_THEN_PRUNE = """\
name: pruned-merge
calibration: {{samples: 2, seq_len: 32}}
stages:
  - merge:
      method: ties
      base: {base}
      models:
        - {{model: {math}, weight: 0.6, density: 0.5}}
        - {{model: {code}, weight: 0.4, density: 0.5}}
  - prune:
      method: magnitude
      sparsity: 0.5
      ignore: [lm_head]
evaluate:
  tasks: [perplexity]
  limit: 2
  log_samples: true
"""


def _strings(value) -> list[str]:
    """Every string anywhere in a JSON value (keys included)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (k, *_strings(v))]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


def test_saved_lm_eval_results_of_a_merge_name_the_report_rows_not_the_deleted_temporary_folder(tiny_llama, tmp_path):
    math = perturbed_copy(tiny_llama, tmp_path / "math", seed=1)
    code = perturbed_copy(tiny_llama, tmp_path / "code", seed=2)
    (tmp_path / "r.yaml").write_text(MERGE_THEN_PRUNE.format(base=tiny_llama, math=math, code=code))
    out = tmp_path / "out"
    assert main(["--recipe", str(tmp_path / "r.yaml"), "-o", str(out), "-q", "--no-perplexity"]) == 0

    report = json.loads((out / "eval" / "report.json").read_text())
    rows = {row["name"]: row["reference"] for row in report["models"]}
    assert rows["base"] == f"ties merge of {math}, {code}, {tiny_llama} (base)"
    for name, reference in rows.items():
        results = json.loads((out / "eval" / "lm_eval_results" / f"{name}.json").read_text())
        assert results["config"]["model"] == reference, name
        assert [s for s in _strings(results) if ".merged-" in s] == [], name
    # Nowhere in OUT (lm-eval's samples folder and its own results JSON there included) is the
    # temporary folder named: it is gone once the run ends.
    assert not list(tmp_path.glob(".out.merged-*"))
    named = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".md", ".yaml") and ".merged-" in p.read_text()]
    assert named == []
    assert list((out / "eval" / "samples" / "base").glob("results_*.json"))


# ---------------------------------------------------------------- tasks that run model-written code

UNSAFE_TASK = """\
task: runs_code
unsafe_code: true
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{q}}}}"
doc_to_choice: ["a", "b"]
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture
def unsafe_task(tmp_path, monkeypatch) -> str:
    """A task marked `unsafe_code` among the tasks a recipe may name (a recipe has no include
    path, so it joins the built-in ones), with its data on disk as lm-eval reads it."""
    from compressor.evaluation import builtin_tasks, catalog

    tasks = tmp_path / "tasks"
    shutil.copytree(builtin_tasks.builtin_task_dir(), tasks)
    data = tmp_path / "runs_code.jsonl"
    data.write_text("".join(json.dumps({"q": f"{i}?", "label": i % 2}) + "\n" for i in range(3)))
    (tasks / "runs_code.yaml").write_text(UNSAFE_TASK.format(data=data))
    monkeypatch.setattr(catalog, "builtin_task_dir", lambda: tasks)
    return "runs_code"


def _record_weight_reads(monkeypatch) -> list[str]:
    """Every model load and merge the pipeline starts (each reads weights)."""
    import compressor.merging.recipe_run as recipe_run
    import compressor.pipeline as pipeline

    reads: list[str] = []
    load_model, run_merge = pipeline.load_model, recipe_run.run_merge
    monkeypatch.setattr(pipeline, "load_model", lambda reference, **kw: reads.append(f"load {reference}") or load_model(reference, **kw))
    monkeypatch.setattr(recipe_run, "run_merge", lambda plan, *a, **kw: reads.append("merge") or run_merge(plan, *a, **kw))
    return reads


PRUNE = "name: pruned\ncalibration: {samples: 2, seq_len: 32}\nstages:\n  - prune: {method: magnitude, sparsity: 0.5, ignore: [lm_head]}\n"
MERGE_PRUNE = """\
name: merged
calibration: {{samples: 2, seq_len: 32}}
stages:
  - merge:
      method: linear
      models: [{{model: {a}, weight: 0.5}}, {{model: {b}, weight: 0.5}}]
  - prune: {{method: magnitude, sparsity: 0.5, ignore: [lm_head]}}
"""
EVALUATE = "evaluate:\n  tasks: [perplexity, {task}]\n  limit: 2\n"


@pytest.mark.parametrize("merge", [False, True], ids=["model", "merge"])
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
def test_a_recipe_task_that_runs_model_code_is_refused_at_its_key_before_any_weight_is_read(
    tiny_llama, unsafe_task, tmp_path, capsys, monkeypatch, merge, dry_run,
):
    stages = MERGE_PRUNE.format(a=tiny_llama, b=perturbed_copy(tiny_llama, tmp_path / "b", seed=1)) if merge else PRUNE
    recipe = tmp_path / "r.yaml"
    recipe.write_text(stages + EVALUATE.format(task=unsafe_task))
    line = 1 + (stages + EVALUATE).splitlines().index("  tasks: [perplexity, {task}]")
    reads = _record_weight_reads(monkeypatch)
    argv = [] if merge else [tiny_llama]
    argv += ["--recipe", recipe, "-q", "--no-perplexity", *(["--dry-run"] if dry_run else ["-o", tmp_path / "out"])]
    code, err = run_cli(argv, capsys)
    assert_one_line_refusal(code, err, f"{recipe}:{line} evaluate.tasks: task 'runs_code' runs code the model writes",
                            "evaluate.confirm_run_unsafe_code: true")
    assert reads == [] and not (tmp_path / "out").exists()


def test_a_confirmed_unsafe_task_runs_and_its_tasks_are_built_once_per_model(tiny_llama, unsafe_task, tmp_path, monkeypatch):
    from compressor.evaluation import runner

    # A results cache of its own: another test of the session that scores the same pruned model would
    # otherwise serve its perplexity from the session's cache, and that task would not be built here.
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    builds: list[list[str]] = []
    build_tasks = runner.build_tasks
    monkeypatch.setattr(runner, "build_tasks", lambda names, manager: builds.append(list(names)) or build_tasks(names, manager))
    recipe = PRUNE + EVALUATE.format(task=unsafe_task) + "  confirm_run_unsafe_code: true\n"
    out = compress_into(tiny_llama, recipe, tmp_path)
    report = json.loads((out / "eval" / "report.json").read_text())
    assert {row["name"]: set(row["metrics"]) for row in report["models"]} == {
        "base": {"perplexity", "runs_code"}, "pruned": {"perplexity", "runs_code"},
    }
    # Built (data read) and checked before the base model loaded, then scored on the base as they
    # were: the check costs no extra build. The compressed model gets its own.
    assert builds == [["perplexity", "runs_code"], ["perplexity", "runs_code"]]
    # Again: the base's results come from the cache, and the compressed model scores the tasks
    # built before the model loaded.
    builds.clear()
    (tmp_path / "again").mkdir()
    out = compress_into(tiny_llama, recipe, tmp_path / "again")
    assert json.loads((out / "eval" / "report.json").read_text())["models"][0]["cached_tasks"] == ["perplexity", "runs_code"]
    assert builds == [["perplexity", "runs_code"]]
