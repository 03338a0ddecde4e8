"""Bad input: one line on stderr naming where, exit code 2, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from compressor.cli import main

GOOD = "name: t\ncalibration: {samples: 4, seq_len: 32}\nstages:\n  - quantize: {method: gptq, weights: {bits: 4, group_size: 32}}\n"


def run(argv, capsys):
    code = main([str(a) for a in argv] + ["-q"])
    err = capsys.readouterr().err.strip()
    return code, err


def recipe(tmp_path: Path, text: str = GOOD, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def assert_refused(code, err, *fragments, out: Path | None = None):
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    for fragment in fragments:
        assert fragment in err, err
    if out is not None:
        assert not out.exists() or not any(out.iterdir())


def test_missing_model_path(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run([tmp_path / "nope", "--recipe", recipe(tmp_path), "-o", out], capsys)
    assert_refused(code, err, str(tmp_path / "nope"), "model path not found", out=out)


def test_malformed_model_id(tmp_path, capsys):
    code, err = run(["not a/model id!", "--recipe", recipe(tmp_path), "-o", tmp_path / "o"], capsys)
    assert_refused(code, err, "not a local path and not a Hub id")


def test_hub_id_unreachable_offline(tmp_path, capsys):
    code, err = run(["no-such-org/no-such-model", "--recipe", recipe(tmp_path), "-o", tmp_path / "o"], capsys)
    assert_refused(code, err, "no-such-org/no-such-model", "cannot load", out=tmp_path / "o")


def test_folder_without_config(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    code, err = run([tmp_path / "m", "--recipe", recipe(tmp_path), "-o", tmp_path / "o"], capsys)
    assert_refused(code, err, "no config.json")


def test_pickle_checkpoint_refused(tiny_llama, tmp_path, capsys):
    model = tmp_path / "pickled"
    shutil.copytree(tiny_llama, model)
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    code, err = run([model, "--recipe", recipe(tmp_path), "-o", tmp_path / "o"], capsys)
    assert_refused(code, err, "pytorch_model.bin", "--allow-pickle", out=tmp_path / "o")


def test_remote_code_needs_flag(tiny_llama, tmp_path, capsys):
    model = tmp_path / "remote"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "my_custom_arch"
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    (model / "config.json").write_text(json.dumps(config))
    code, err = run([model, "--recipe", recipe(tmp_path), "-o", tmp_path / "o"], capsys)
    assert_refused(code, err, "--trust-remote-code", out=tmp_path / "o")


def test_output_not_empty(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run([tiny_llama, "--recipe", recipe(tmp_path), "-o", out], capsys)
    assert_refused(code, err, str(out), "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"


def test_recipe_errors_reach_the_cli(tiny_llama, tmp_path, capsys):
    bad = recipe(tmp_path, "name: t\nstages:\n  - quantize:\n      method: gptq\n      weights: {bits: 6}\n")
    code, err = run([tiny_llama, "--recipe", bad, "-o", tmp_path / "o"], capsys)
    assert_refused(code, err, f"{bad}:5 stages[0].quantize.weights.bits: must be one of 2, 3, 4, 8", out=tmp_path / "o")


def test_recipe_file_missing(tiny_llama, tmp_path, capsys):
    code, err = run([tiny_llama, "--recipe", tmp_path / "missing.yaml", "-o", tmp_path / "o"], capsys)
    assert_refused(code, err, "missing.yaml", "recipe file not found")


def test_recipe_not_yaml(tiny_llama, tmp_path, capsys):
    bad = recipe(tmp_path, "name: [\n  oops: {\n")
    code, err = run([tiny_llama, "--recipe", bad, "-o", tmp_path / "o"], capsys)
    assert_refused(code, err, f"{bad}:", "not valid YAML")


def test_seq_len_longer_than_model(tiny_llama, tmp_path, capsys):
    long = recipe(tmp_path, GOOD.replace("seq_len: 32", "seq_len: 4096"))
    code, err = run([tiny_llama, "--recipe", long, "-o", tmp_path / "o"], capsys)
    assert_refused(code, err, f"{long}:2 calibration.seq_len: 4096 is longer than the model allows (256 positions)")


def test_empty_calibration_file(tiny_llama, tmp_path, capsys):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    bad = recipe(tmp_path, GOOD.replace("samples: 4", f"dataset: {data}, samples: 4"))
    code, err = run([tiny_llama, "--recipe", bad, "-o", tmp_path / "o", "--no-perplexity"], capsys)
    assert_refused(code, err, str(data), "dataset is empty", out=tmp_path / "o")


def test_calibration_without_text_column(tiny_llama, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "a", "label": 1}\n')
    bad = recipe(tmp_path, GOOD.replace("samples: 4", f"dataset: {data}, samples: 4"))
    code, err = run([tiny_llama, "--recipe", bad, "-o", tmp_path / "o", "--no-perplexity"], capsys)
    assert_refused(code, err, str(data), "no text column", "question, label", out=tmp_path / "o")


def test_calibration_too_small(tiny_llama, tmp_path, capsys):
    data = tmp_path / "d.txt"
    data.write_text("just a few words")
    bad = recipe(tmp_path, GOOD.replace("samples: 4", f"dataset: {data}, samples: 4"))
    code, err = run([tiny_llama, "--recipe", bad, "-o", tmp_path / "o", "--no-perplexity"], capsys)
    assert_refused(code, err, "calibration.samples:", "lower samples or seq_len", out=tmp_path / "o")


def test_targets_matching_nothing(tiny_llama, tmp_path, capsys):
    bad = recipe(tmp_path, GOOD.replace("group_size: 32}", "group_size: 32}, targets: ['re:.*nothing']"))
    code, err = run([tiny_llama, "--recipe", bad, "--dry-run"], capsys)
    assert_refused(code, err, f"{bad}:4 stages[0].quantize.targets: matches no Linear module")


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--recipe"], "expected one argument"),
        (["MODEL", "--recipe", "RECIPE", "--batch-size", "0"], "expected a positive integer"),
        (["MODEL", "--recipe", "RECIPE", "--bogus"], "unrecognized arguments: --bogus"),
        (["MODEL", "--recipe", "RECIPE"], "--output/-o is required"),
    ],
)
def test_bad_flags(argv, fragment, tiny_llama, tmp_path, capsys):
    argv = [str(tiny_llama) if a == "MODEL" else str(recipe(tmp_path)) if a == "RECIPE" else a for a in argv]
    with pytest.raises(SystemExit) if "--output/-o" not in fragment else _no_raise():
        code = main(argv + ["-q"])
        assert code == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
