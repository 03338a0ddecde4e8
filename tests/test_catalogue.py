"""A catalogue of bad input: malformed recipes and CLI invocations.

Every entry must exit with code 2, print exactly one line on stderr that names where the
problem is (file:line and key for a recipe), and write nothing: no OUT, no staging folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli_runs import assert_one_line_refusal, run_cli

HEAD = "name: t\ncalibration: {samples: 4, seq_len: 32}\nstages:\n"
QUANT = "  - quantize: {method: gptq, weights: {bits: 4, group_size: 32}}\n"

# (id, recipe text, fragments the one-line error must contain; "R" stands for the recipe path)
RECIPES: list[tuple[str, str, tuple[str, ...]]] = [
    ("empty-file", "", ("R:", "must be a YAML mapping")),
    ("top-level-list", "- a\n- b\n", ("R:1:", "must be a YAML mapping")),
    ("top-level-scalar", "hello\n", ("R:1:", "must be a YAML mapping")),
    ("not-yaml", "name: [\n  oops: {\n", ("R:3:", "not valid YAML")),
    ("python-tag", "name: !!python/object/apply:os.system ['true']\nstages:\n" + QUANT, ("R:1 name:", "is not allowed")),
    ("duplicate-key", "name: t\nname: u\nstages:\n" + QUANT, ("R:2 name:", "duplicate key")),
    ("name-not-text", "name: [a, b]\nstages:\n" + QUANT, ("R:1 name:",)),
    ("missing-stages", "name: t\n", ("R:1 stages:", "required key missing")),
    ("empty-stages", "name: t\nstages: []\n", ("R:2 stages:", "at least 1 item")),
    ("unknown-top-key", HEAD + QUANT + "extra: 1\n", ("R:5 extra:", "unknown key 'extra'")),
    ("misspelled-stages", "name: t\nstage:\n" + QUANT, ("R:2 stage:", "unknown key 'stage'")),
    ("unknown-stage", HEAD + "  - quantise: {method: gptq}\n", ("R:4 stages[0].quantise:", "did you mean 'quantize'")),
    ("stage-two-kinds", HEAD + "  - quantize: {method: gptq}\n    extra: {method: x}\n", ("R:4 stages[0]:", "exactly one key")),
    ("stage-scalar", HEAD + "  - quantize\n", ("R:4 stages[0]:", "exactly one key")),
    ("unknown-method", HEAD + "  - quantize: {method: gtpq}\n", ("R:4 stages[0].quantize.method:", "did you mean 'gptq'")),
    ("missing-method", HEAD + "  - quantize: {weights: {bits: 4}}\n", ("R:4 stages[0].quantize.method:", "required key missing")),
    ("bits-6", HEAD + "  - quantize: {method: gptq, weights: {bits: 6}}\n", ("R:4 stages[0].quantize.weights.bits:", "got 6")),
    ("bits-string", HEAD + '  - quantize: {method: gptq, weights: {bits: "4"}}\n', ("R:4 stages[0].quantize.weights.bits:", "got '4'")),
    ("group-zero", HEAD + "  - quantize: {method: gptq, weights: {group_size: 0}}\n", ("R:4 stages[0].quantize.weights.group_size:", "greater than 0")),
    ("group-negative", HEAD + "  - quantize: {method: gptq, weights: {group_size: -8}}\n", ("R:4 stages[0].quantize.weights.group_size:", "got -8")),
    ("symmetric-maybe", HEAD + "  - quantize: {method: gptq, weights: {symmetric: maybe}}\n", ("R:4 stages[0].quantize.weights.symmetric:", "true or false")),
    ("weights-unknown-key", HEAD + "  - quantize: {method: gptq, weights: {bitz: 4}}\n", ("R:4 stages[0].quantize.weights.bitz:", "unknown key")),
    ("observer-unknown", HEAD + "  - quantize: {method: gptq, weights: {observer: max}}\n", ("R:4 stages[0].quantize.weights.observer:", "got 'max'")),
    ("quantize-unknown-key", HEAD + "  - quantize: {method: gptq, actorder: true}\n", ("R:4 stages[0].quantize.actorder:", "unknown key")),
    ("dampening-zero", HEAD + "  - quantize: {method: gptq, dampening: 0}\n", ("R:4 stages[0].quantize.dampening:", "greater than 0")),
    ("dampening-above-one", HEAD + "  - quantize: {method: gptq, dampening: 1.5}\n", ("R:4 stages[0].quantize.dampening:", "less than 1")),
    ("block-size-zero", HEAD + "  - quantize: {method: gptq, block_size: 0}\n", ("R:4 stages[0].quantize.block_size:", "greater than 0")),
    ("gptq-option-on-rtn", HEAD + "  - quantize: {method: rtn, dampening: 0.05}\n", ("R:4 stages[0].quantize:", "`dampening` is a GPTQ option")),
    ("gptqmodel-key", HEAD + "  - quantize: {method: gptq, desc_act: false}\n", ("R:4 stages[0].quantize.desc_act:", "use `act_order")),
    ("targets-empty", HEAD + "  - quantize: {method: gptq, targets: []}\n", ("R:4 stages[0].quantize.targets:", "at least 1 item")),
    ("targets-bad-regex", HEAD + '  - quantize: {method: gptq, targets: ["re:("]}\n', ("R:4 stages[0].quantize.targets:", "invalid regex")),
    ("targets-match-nothing", HEAD + '  - quantize: {method: gptq, targets: ["re:.*nothing"]}\n', ("R:4 stages[0].quantize.targets:", "matches no Linear")),
    ("samples-zero", "name: t\ncalibration: {samples: 0}\nstages:\n" + QUANT, ("R:2 calibration.samples:", "greater than 0")),
    ("seq-len-zero", "name: t\ncalibration: {seq_len: 0}\nstages:\n" + QUANT, ("R:2 calibration.seq_len:", "greater than 0")),
    ("seq-len-too-long", "name: t\ncalibration: {samples: 4, seq_len: 4096}\nstages:\n" + QUANT, ("R:2 calibration.seq_len:", "longer than the model allows")),
    ("seed-negative", "name: t\ncalibration: {seed: -1}\nstages:\n" + QUANT, ("R:2 calibration.seed:", "greater than or equal to 0")),
    ("calibration-unknown-key", "name: t\ncalibration: {sample: 4}\nstages:\n" + QUANT, ("R:2 calibration.sample:", "unknown key")),
    ("dataset-missing", "name: t\ncalibration: {dataset: /nonexistent/d.jsonl, samples: 4, seq_len: 32}\nstages:\n" + QUANT, ("/nonexistent/d.jsonl", "not found")),
    ("evaluate-limit-zero", HEAD + QUANT + "evaluate: {tasks: [perplexity], limit: 0}\n", ("R:5 evaluate.limit:", "a positive whole number of examples or a fraction between 0 and 1")),
    ("evaluate-no-tasks", HEAD + QUANT + "evaluate: {tasks: []}\n", ("R:5 evaluate.tasks:", "at least 1 item")),
    ("output-format", HEAD + QUANT + "output: {format: gguf}\n", ("R:5 output.format:", "got 'gguf'")),
    ("output-unknown-key", HEAD + QUANT + "output: {folder: x}\n", ("R:5 output.folder:", "unknown key")),
]


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "work" / "out"


def _assert_refused(code: int, err: str, fragments: tuple[str, ...], out: Path) -> None:
    assert_one_line_refusal(code, err, *fragments)
    parent = out.parent
    assert not out.exists(), "a refused run must not create OUT"
    leftovers = [p.name for p in parent.iterdir()] if parent.exists() else []
    assert leftovers == [], f"a refused run left {leftovers}"


@pytest.mark.parametrize("text, fragments", [c[1:] for c in RECIPES], ids=[c[0] for c in RECIPES])
def test_malformed_recipe(text, fragments, tiny_llama, tmp_path, out, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    fragments = tuple(f.replace("R:", f"{path}:") for f in fragments)
    code, err = run_cli([tiny_llama, "--recipe", path, "-o", out, "-q", "--no-perplexity"], capsys)
    _assert_refused(code, err, fragments, out)


GOOD = HEAD + "  - quantize: {method: rtn, weights: {bits: 4, group_size: 32}}\n"

# (id, argv with MODEL / RECIPE / OUT placeholders, fragments)
INVOCATIONS: list[tuple[str, list[str], tuple[str, ...]]] = [
    ("no-arguments", [], ("required: --recipe",)),
    ("no-recipe", ["MODEL", "-o", "OUT"], ("required: --recipe",)),
    ("no-output", ["MODEL", "--recipe", "RECIPE"], ("--output/-o is required",)),
    ("unknown-flag", ["MODEL", "--recipe", "RECIPE", "-o", "OUT", "--bogus"], ("unrecognized arguments: --bogus",)),
    ("batch-size-zero", ["MODEL", "--recipe", "RECIPE", "-o", "OUT", "--batch-size", "0"], ("--batch-size", "positive integer")),
    ("batch-size-text", ["MODEL", "--recipe", "RECIPE", "-o", "OUT", "--batch-size", "x"], ("--batch-size", "'x'")),
    ("device-unknown", ["MODEL", "--recipe", "RECIPE", "-o", "OUT", "--device", "banana"], ("--device", "unknown device 'banana'")),
    ("unknown-builtin-recipe", ["MODEL", "--recipe", "w4a16-gtpq", "-o", "OUT"], ("no built-in recipe 'w4a16-gtpq'",)),
    ("recipe-missing", ["MODEL", "--recipe", "missing.yaml", "-o", "OUT"], ("missing.yaml", "recipe file not found")),
    ("recipe-is-folder", ["MODEL", "--recipe", "TMP", "-o", "OUT"], ("cannot read recipe",)),
    ("model-path-missing", ["TMP/nope", "--recipe", "RECIPE", "-o", "OUT"], ("nope", "model path not found")),
    ("model-id-malformed", ["not a/model id!", "--recipe", "RECIPE", "-o", "OUT"], ("not a local path and not a Hub id",)),
    ("model-hub-offline", ["no-such-org/no-such-model", "--recipe", "RECIPE", "-o", "OUT"], ("no-such-org/no-such-model", "cannot load")),
    ("model-unknown-builtin", ["builtin:nope", "--recipe", "RECIPE", "-o", "OUT"], ("unknown built-in model",)),
    ("model-is-a-file", ["MODEL/config.json", "--recipe", "RECIPE", "-o", "OUT"], ("not a checkpoint folder or a .gguf file",)),
    ("model-fake-gguf", ["TMP/fake.gguf", "--recipe", "RECIPE", "-o", "OUT"], ("fake.gguf", "not a GGUF file")),
    ("output-is-a-file", ["MODEL", "--recipe", "RECIPE", "-o", "TMP/afile"], ("afile", "not a folder")),
    ("recipes-extra-argument", ["recipes", "extra"], ("unrecognized arguments: extra",)),
]


@pytest.mark.parametrize("argv, fragments", [c[1:] for c in INVOCATIONS], ids=[c[0] for c in INVOCATIONS])
def test_malformed_invocation(argv, fragments, tiny_llama, tmp_path, out, capsys):
    recipe = tmp_path / "good.yaml"
    recipe.write_text(GOOD)
    (tmp_path / "fake.gguf").write_text("not a gguf file")
    (tmp_path / "afile").write_text("keep me")
    names = {"MODEL": str(tiny_llama), "RECIPE": str(recipe), "OUT": str(out), "TMP": str(tmp_path)}
    resolved = []
    for arg in argv:
        for placeholder, value in names.items():
            arg = arg.replace(placeholder, value) if arg.startswith(placeholder) else arg
        resolved.append(arg)
    code, err = run_cli(resolved, capsys)
    _assert_refused(code, err, fragments, out)
    assert (tmp_path / "afile").read_text() == "keep me"


def test_catalogue_is_large_enough():
    assert len(RECIPES) + len(INVOCATIONS) >= 40
