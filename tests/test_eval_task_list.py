"""`compress eval --tasks list` (list_groups, list_subtasks, list_tags), as lm-eval's `--tasks list` /
`lm-eval ls`: no model, no output folder; and the text scan behind it and behind `--tasks`
checks, which must hold exactly the names and kinds of lm-eval's own task index (lm-eval's
`TaskIndex.build` is the oracle, on made-up folders with its edge cases and on real ones)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from compressor.evaluation.catalog import _lm_eval_task_root
from compressor.evaluation.lm_eval_index import scan_lm_eval_index
from tests.cli_runs import assert_one_line_refusal, run_cli

ROW = re.compile(r"^\| (\S+) \| (group|task|tag) \| (.+) \|$", re.M)


def _rows(text: str) -> list[tuple[str, str, str]]:
    return ROW.findall(text)


def _lm_eval_kinds(root: Path) -> dict[str, str]:
    from lm_eval.tasks._index import Kind, TaskIndex

    words = {Kind.TASK: "task", Kind.PY_TASK: "task", Kind.GROUP: "group", Kind.TAG: "tag"}
    return {name: words[entry.kind] for name, entry in TaskIndex.build([root]).items()}


# ---------------------------------------------------------------- the scan against lm-eval's index

def _edge_cases(root: Path) -> Path:
    """Task files with what lm-eval's index does with each: the oracle below says what is right."""
    files = {
        "a/plain.yaml": "task: plain_task\ntag: [t_inline, t_shared]\ndataset_path: x\n",
        "a/_template_yaml": "tag:\n  - t_template\noutput_type: loglikelihood\n",
        "a/uses_template.yaml": "include: _template_yaml\ntask: templated_task\n",
        "a/overrides_template_tag.yaml": "include: _template_yaml\n\"task\": 'own_tag_task'\ntag: t_own\n",
        "a/unincluded": "tag: t_nobody_includes\ntask: not_a_yaml_file\n",
        "b/group.yaml": "group: my_group\ntask:\n  - plain_task\n  - task: inline_member\n    num_fewshot: 0\ntag: group_tag_ignored\n",
        "b/python_task.yaml": "group: py_group_ignored\ntask: py_task\nclass: !function task.Foo\n",
        "b/group_and_task.yaml": "group: old_style_group\ntask: hidden_task\n",
        "b/task_list_without_group.yaml": "task: [x, y]\n",
        "b/missing_include.yaml": "include: nowhere_yaml\ntask: broken_task\n",
        "b/duplicate.yaml": "task: plain_task\ntag: t_of_duplicate\n",  # sorted after a/plain.yaml: skipped
        "c/include_across_folders.yaml": "include: ../a/uses_template.yaml\ntask: c_task\ntag: t_c\n",
        "c/__pycache__/cached.yaml": "task: cached_task\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_scan_files_names_and_kinds_as_lm_evals_index_does(tmp_path):
    root = _edge_cases(tmp_path / "tasks")
    oracle = _lm_eval_kinds(root)
    assert oracle == {"plain_task": "task", "t_inline": "tag", "t_shared": "tag", "templated_task": "task", "t_template": "tag",
                      "own_tag_task": "task", "t_own": "tag", "my_group": "group", "py_task": "task",
                      "old_style_group": "group", "c_task": "task", "t_c": "tag"}  # what lm-eval 0.4.13 makes of these files
    found = scan_lm_eval_index(root)
    assert {name: entry.kind for name, entry in found.items()} == oracle
    assert (found["templated_task"].folder, found["templated_task"].path) == ("a", "a/uses_template.yaml")
    assert (found["c_task"].folder, found["t_c"].path) == ("c", "c/include_across_folders.yaml")


@pytest.mark.parametrize("folder", ["arc", "mmlu", "evalita_llm", "scrolls", "model_written_evals", "darija_bench"])
def test_the_scan_of_real_lm_eval_folders_matches_its_index(folder):
    root = _lm_eval_task_root() / folder
    assert {name: entry.kind for name, entry in scan_lm_eval_index(root).items()} == _lm_eval_kinds(root)


def test_a_name_only_a_stray_file_defines_is_unknown_before_anything_loads(tiny_llama, tmp_path, capsys):
    # `group: scrolls` sits in Python-task files, where lm-eval reads `class` and `task` only
    code, err = run_cli(["eval", f"m={tiny_llama}", "--tasks", "scrolls", "-o", tmp_path / "o"], capsys)
    assert_one_line_refusal(code, err, "--tasks", "unknown task 'scrolls'", "scrolls_")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- compress eval --tasks list

def _list(capsys, *flags) -> str:
    from compressor.cli import main

    capsys.readouterr()
    assert main(["eval", *[str(f) for f in flags]]) == 0
    return capsys.readouterr().out


def test_tasks_list_prints_built_in_and_lm_eval_names_with_kind_and_file(capsys):
    out = _list(capsys, "--tasks", "list")
    rows = _rows(out)
    assert rows[:2] == [("abstracts_match", "task", "built-in: abstracts_match.yaml"), ("perplexity", "task", "built-in: perplexity.yaml")]
    for row in [("arc_easy", "task", "lm_eval/tasks/arc/arc_easy.yaml"), ("mmlu", "group", "lm_eval/tasks/mmlu/default/_mmlu.yaml"),
                ("ai2_arc", "tag", "lm_eval/tasks/arc/arc_challenge.yaml")]:
        assert row in rows, row
    index = scan_lm_eval_index(_lm_eval_task_root())
    assert len(rows) == 2 + len(index) and len({name for name, _, _ in rows}) == len(rows)
    groups = sum(e.kind == "group" for e in index.values())
    assert f"2 built-in (2 tasks); {len(index):,} from lm-eval" in out and f"({groups:,} groups, " in out


@pytest.mark.parametrize("word, kind", [("list_groups", "group"), ("list_subtasks", "task"), ("list_tags", "tag")])
def test_list_words_keep_one_kind(capsys, word, kind):
    rows = _rows(_list(capsys, "--tasks", word))
    assert rows and {k for _, k, _ in rows} == {kind}


def test_include_path_names_come_first_and_shadow_the_others(tmp_path, capsys):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "d.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    body = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\noutput_type: loglikelihood_rolling\ntest_split: test\n"
    (tasks / "mine.yaml").write_text(f"task: my_words\ntag: my_tag\n{body}")
    (tasks / "shadow.yaml").write_text(f"task: perplexity\n{body}")  # an include path wins over the built-in, as in --tasks
    rows = _rows(_list(capsys, "--tasks", "list", "--include-path", tasks))
    assert rows[:3] == [("my_tag", "tag", str(tasks.resolve() / "mine.yaml")), ("my_words", "task", str(tasks.resolve() / "mine.yaml")),
                        ("perplexity", "task", str(tasks.resolve() / "shadow.yaml"))]
    assert rows[3] == ("abstracts_match", "task", "built-in: abstracts_match.yaml")
    assert [r for r in rows if r[0] == "perplexity"] == [rows[2]]


def test_a_malformed_include_file_is_still_file_and_line(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("task: a\n  b: [\n")
    code, err = run_cli(["eval", "--tasks", "list", "--include-path", tmp_path], capsys)
    assert_one_line_refusal(code, err, f"{tmp_path / 'bad.yaml'}:")


@pytest.mark.parametrize("extra", [["m=model"], ["-o", "report"]], ids=["model", "output"])
def test_list_with_a_model_or_an_output_is_refused(tmp_path, capsys, extra):
    code, err = run_cli(["eval", "--tasks", "list", *extra], capsys)
    assert_one_line_refusal(code, err, "--tasks list", "evaluates nothing", "leave out NAME=MODEL and --output")


@pytest.mark.parametrize(
    "argv, missing",
    [(["--tasks", "perplexity"], "NAME=MODEL, --output/-o"), (["m=x", "--tasks", "perplexity"], "--output/-o"),
     (["--tasks", "perplexity", "-o", "r"], "NAME=MODEL")],
)
def test_an_evaluation_still_needs_models_and_an_output(capsys, argv, missing):
    code, err = run_cli(["eval", *argv], capsys)
    assert_one_line_refusal(code, err, f"compress eval: the following arguments are required: {missing}")


def test_a_tag_over_tasks_in_several_folders_brings_all_of_them(tmp_path, monkeypatch):
    """lm-eval 0.4.13 has 7 such tags (math_word_problems spans 7 folders); only the first
    folder's tasks used to be indexed for the run, so the others were left out silently."""
    from compressor.evaluation import catalog

    root = tmp_path / "tasks"
    for folder in ("one", "two", "three"):
        (root / folder).mkdir(parents=True)
        tag = "shared_tag" if folder != "three" else "other_tag"
        (root / folder / f"{folder}.yaml").write_text(f"task: task_{folder}\ntag: {tag}\ndataset_path: x\n")
    monkeypatch.setattr(catalog, "_lm_eval_task_root", lambda: root)
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))  # the session's cache holds the real index
    tasks = catalog.TaskCatalog().resolve(["shared_tag"])
    assert tasks[0].lm_eval_folders == ("one", "two")
    manager = catalog.TaskCatalog().task_manager(tasks)
    assert manager.task_index["shared_tag"].tags == {"task_one", "task_two"}
    (single,) = catalog.TaskCatalog().resolve(["other_tag"])
    assert "task_one" not in catalog.TaskCatalog().task_manager([single]).task_index  # one folder: only that one indexed
