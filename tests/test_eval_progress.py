"""`-q` silences every progress bar lm-eval draws in our runs (request loops, prompt building,
bootstrapped stderr), for `compress eval` and a recipe's `evaluate:` block; without `-q` they
are all drawn. Checked on the stderr of real lm-eval runs on a tiny random model, with a task
of each request type: loglikelihood_rolling (perplexity), multiple choice (abstracts_match),
generate_until and a bootstrapped metric (lm-eval's `perplexity` aggregation, as lambada's)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import tqdm

from compressor.cli import main

BAR = re.compile(r"\d+%\|")  # tqdm's "  40%|████      | 2/5 [...]"


def _tasks(folder: Path) -> Path:
    folder.mkdir()
    data = folder / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": f"Say {word}.", "a": word}) + "\n" for word in ("yes", "no", "maybe")))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\ndoc_to_text: \"{{{{q}}}}\"\n"
    (folder / "say.yaml").write_text(
        f"task: say_word\n{common}output_type: generate_until\ndoc_to_target: \"{{{{a}}}}\"\n"
        'generation_kwargs:\n  until: ["\\n\\n"]\n  max_gen_toks: 4\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (folder / "last.yaml").write_text(  # lm-eval bootstraps the stderr of a `perplexity` aggregation
        f"task: last_word\n{common}output_type: loglikelihood\ndoc_to_target: \" {{{{a}}}}\"\n"
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
    )
    return folder


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory) -> Path:
    return _tasks(tmp_path_factory.mktemp("progress") / "tasks")


def _eval_output(model: Path, tasks: Path, out: Path, capfd, *flags: str):
    argv = ["eval", f"m={model}", "--tasks", "perplexity,abstracts_match,say_word,last_word", "--include-path", str(tasks),
            "--limit", "2", "--no-cache", "-o", str(out), *flags]
    capfd.readouterr()
    assert main(argv) == 0
    return capfd.readouterr()


def _eval_stderr(model: Path, tasks: Path, out: Path, capfd, *flags: str) -> str:
    return _eval_output(model, tasks, out, capfd, *flags).err


def test_quiet_eval_draws_no_lm_eval_progress_bar(tiny_llama, task_folder, tmp_path, capfd):
    err = _eval_stderr(tiny_llama, task_folder, tmp_path / "quiet", capfd, "-q")
    assert not BAR.search(err), err
    assert "Running loglikelihood requests" not in err and "Running generate_until requests" not in err
    report = json.loads((tmp_path / "quiet" / "report.json").read_text())
    assert set(report["models"][0]["metrics"]) == {"perplexity", "abstracts_match", "say_word", "last_word"}
    stderr_of_bootstrap = report["models"][0]["metrics"]["last_word"]["perplexity"]["stderr"]
    assert stderr_of_bootstrap is not None  # the bootstrap still ran: only its bar is gone


def test_without_quiet_every_lm_eval_bar_is_drawn(tiny_llama, task_folder, tmp_path, capfd):
    err = _eval_stderr(tiny_llama, task_folder, tmp_path / "loud", capfd)
    for bar in ("Running loglikelihood requests", "Tokenizing inputs", "Running generate_until requests"):
        assert re.search(re.escape(bar) + r": 100%\|", err), bar
    assert len(re.findall(r"(?m)(?:^|\r)100%\|[^\r\n]*\| 2/2 ", err)) >= 4  # each task's prompts, built
    assert re.search(r"(?:^|\r|\n)100%\|[^\r\n]*\| 1/1 ", err)  # the bootstrap of last_word's perplexity


def test_quiet_eval_drops_lm_eval_progress_prints(tiny_llama, task_folder, tmp_path, capfd):
    """lm-eval prints "bootstrapping for stddev: ..." to stdout for a bootstrapped metric; -q drops it."""
    assert "bootstrapping for stddev" in _eval_output(tiny_llama, task_folder, tmp_path / "loud", capfd).out
    quiet = _eval_output(tiny_llama, task_folder, tmp_path / "quiet", capfd, "-q")
    assert "bootstrapping for stddev" not in quiet.out and "bootstrapping" not in quiet.err
    assert (tmp_path / "quiet" / "report.json").is_file()


def test_bootstraps_run_in_process_without_forking_a_pool(tiny_llama, task_folder, tmp_path, capfd, monkeypatch):
    """lm-eval's bootstrap pool forked the evaluating process, and a worker it could not end hung the
    run; under DISABLE_MULTIPROC (set for the run only) lm-eval draws the same samples in process."""
    import multiprocessing.pool
    import os

    def forks(*args, **kwargs):
        raise AssertionError("lm-eval forked a pool for its bootstrap")

    monkeypatch.setattr(multiprocessing.pool.Pool, "__init__", forks)
    monkeypatch.delenv("DISABLE_MULTIPROC", raising=False)
    out = _eval_output(tiny_llama, task_folder, tmp_path / "r", capfd)
    assert "bootstrapping for stddev" in out.out  # the bootstrap ran
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["models"][0]["metrics"]["last_word"]["perplexity"]["stderr"] is not None
    assert "DISABLE_MULTIPROC" not in os.environ


def test_the_swapped_tqdm_is_put_back(tiny_llama, task_folder, tmp_path, capfd):
    import lm_eval.api.task as task_module

    before = (tqdm.tqdm, task_module.tqdm)
    _eval_stderr(tiny_llama, task_folder, tmp_path / "quiet", capfd, "-q")
    assert (tqdm.tqdm, task_module.tqdm) == before


def test_recipe_evaluate_under_compress_q_draws_no_lm_eval_bar(tiny_llama, tmp_path, capfd):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: t\ncalibration: {samples: 2, seq_len: 32}\nstages:\n  - prune: {method: magnitude, sparsity: 0.5, ignore: [lm_head]}\n"
        "evaluate:\n  tasks: [perplexity, abstracts_match]\n  limit: 2\n"
    )
    capfd.readouterr()
    assert main([str(tiny_llama), "--recipe", str(recipe), "-o", str(tmp_path / "out"), "-q", "--no-perplexity"]) == 0
    err = capfd.readouterr().err
    assert not BAR.search(err), err
    assert (tmp_path / "out" / "eval" / "report.json").is_file()


def _method_parameters(source: str, class_name: str) -> dict[str, list[str]]:
    tree = ast.parse(source)
    found = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    return {f.name: [a.arg for a in f.args.args + f.args.kwonlyargs] for f in found.body if isinstance(f, ast.FunctionDef)}


@pytest.mark.parametrize("module, class_name", [("huggingface", "HFLM"), ("vllm_causallms", "VLLM")])
def test_every_method_the_switch_overrides_takes_disable_tqdm_in_the_installed_lm_eval(module, class_name):
    """vLLM is not installed here, so lm-eval's VLLM class cannot be imported: its source is read instead."""
    import lm_eval.models

    from compressor.evaluation.progress import QuietableRequests

    source = (Path(lm_eval.models.__file__).parent / f"{module}.py").read_text()
    methods = _method_parameters(source, class_name)
    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until", "_loglikelihood_tokens"):
        assert name in vars(QuietableRequests) and "disable_tqdm" in methods[name], (class_name, name)
