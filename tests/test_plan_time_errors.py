"""What a run would refuse only after earlier stages ran is refused when the recipe is planned:
`--dry-run` and the real run give the same one line (file:line key), exit 2, write nothing,
and leave no stage checkpoint beside OUT."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from compressor.cli import main

HEAD = "name: t\ncalibration: {samples: 4, seq_len: 32}\nstages:\n"
RTN = "  - quantize: {method: rtn, weights: {bits: 4, group_size: 32}}\n"


def run(argv) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv] + ["-q"])
    return code, err.getvalue().strip()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def assert_refused_both_ways(model: Path, recipe: Path, tmp_path: Path, *fragments: str) -> str:
    """The dry run and the real run refuse with the same line; the real run leaves nothing."""
    out = tmp_path / "out"
    dry_code, dry_err = run([model, "--recipe", recipe, "--dry-run"])
    code, err = run([model, "--recipe", recipe, "-o", out, "--no-perplexity"])
    for c, e in ((dry_code, dry_err), (code, err)):
        assert c == 2, e
        assert len(e.splitlines()) == 1, e
        for fragment in fragments:
            assert fragment in e, e
    assert dry_err == err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"], "something was written beside OUT"
    return err


def test_quantize_twice_on_the_same_layers(tiny_llama, tmp_path):
    recipe = write(tmp_path, HEAD + RTN + RTN)
    assert_refused_both_ways(tiny_llama, recipe, tmp_path, f"{recipe}:5 stages[1].quantize.targets",
                             "already replaced by stages[0]")


def test_prune_after_quantize(tiny_llama, tmp_path):
    recipe = write(tmp_path, HEAD + RTN + "  - prune: {method: magnitude, sparsity: 0.5}\n")
    assert_refused_both_ways(tiny_llama, recipe, tmp_path, f"{recipe}:5 stages[1].prune.targets", "prune before quantizing")


def test_eora_without_quantization(tiny_llama, tmp_path):
    recipe = write(tmp_path, HEAD + "  - prune: {method: magnitude, sparsity: 0.5}\n  - lowrank: {method: eora, rank: 4}\n")
    assert_refused_both_ways(tiny_llama, recipe, tmp_path, f"{recipe}:5 stages[1].lowrank.method", "put a quantize stage before it")


def test_eora_original_that_does_not_exist(tiny_llama, tmp_path):
    missing = tmp_path / "no-such-original"
    recipe = write(tmp_path, HEAD + RTN + f"  - lowrank: {{method: eora, rank: 4, original: {missing}}}\n")
    assert_refused_both_ways(tiny_llama, recipe, tmp_path, f"{recipe}:5 stages[1].lowrank.original",
                             f"{missing}: model path not found")


def test_missing_calibration_file(tiny_llama, tmp_path):
    missing = tmp_path / "nope.jsonl"
    recipe = write(tmp_path, HEAD.replace("samples: 4", f"dataset: {missing}, samples: 4") + RTN.replace("rtn", "gptq"))
    assert_refused_both_ways(tiny_llama, recipe, tmp_path, f"{recipe}:2 calibration.dataset",
                             f"{missing}: calibration file not found")


def test_unknown_builtin_dataset_in_a_stage_block(tiny_llama, tmp_path):
    text = HEAD + RTN + "  - distill:\n      steps: 2\n      data: {dataset: builtin:nosuch, samples: 2, seq_len: 32}\n"
    recipe = write(tmp_path, text)
    assert_refused_both_ways(tiny_llama, recipe, tmp_path, f"{recipe}:7 stages[1].distill.data.dataset",
                             "unknown built-in dataset")


def test_a_calibration_set_that_is_not_needed_is_not_checked(tiny_llama, tmp_path):
    recipe = write(tmp_path, HEAD.replace("samples: 4", f"dataset: {tmp_path / 'nope.jsonl'}, samples: 4") + RTN)
    code, err = run([tiny_llama, "--recipe", recipe, "--dry-run"])
    assert code == 0, err  # RTN reads no calibration data


def test_partly_quantized_targets_are_allowed(tiny_llama, tmp_path):
    # Mixed precision: MLPs at 4 bits, then "everything left" at 8 bits.
    text = HEAD + RTN.replace("}}", "}, targets: ['re:.*mlp.*']}") + RTN.replace("bits: 4", "bits: 8")
    code, err = run([tiny_llama, "--recipe", write(tmp_path, text), "--dry-run"])
    assert code == 0, err


def test_broken_parquet_calibration_file(tiny_llama, tmp_path):
    data = tmp_path / "bad.parquet"
    data.write_text("not a parquet file")
    recipe = write(tmp_path, HEAD.replace("samples: 4", f"dataset: {data}, samples: 4") + RTN.replace("rtn", "gptq"))
    code, err = run([tiny_llama, "--recipe", recipe, "-o", tmp_path / "out", "--no-perplexity"])
    assert code == 2, err
    assert len(err.splitlines()) == 1 and f"{recipe}:2 calibration.dataset: {data}: cannot read the parquet file" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value, key", [(".inf", "lr"), ("-.inf", "lr"), (".nan", "lr")])
def test_non_finite_numbers(tiny_llama, tmp_path, value, key):
    recipe = write(tmp_path, HEAD + RTN + f"  - distill:\n      steps: 2\n      {key}: {value}\n")
    code, err = run([tiny_llama, "--recipe", recipe, "--dry-run"])
    assert code == 2 and f"{recipe}:7 stages[1].distill.{key}: Input should be a finite number" in err, err


def test_output_folder_follows_the_umask(tiny_llama, tmp_path):
    recipe = write(tmp_path, HEAD + RTN)
    previous = os.umask(0o022)
    try:
        code, err = run([tiny_llama, "--recipe", recipe, "-o", tmp_path / "out", "--no-perplexity"])
    finally:
        os.umask(previous)
    assert code == 0, err
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755  # not mkdtemp's 0o700
    assert json.loads((tmp_path / "out" / "compression.json").read_text())["stages"][0]["kind"] == "quantize"


def test_targets_are_checked_before_any_weight_is_read(tiny_llama, tmp_path, monkeypatch):
    import compressor.pipeline as pipeline

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded before the recipe was planned")

    monkeypatch.setattr(pipeline, "load_model", no_load)
    recipe = write(tmp_path, HEAD + "  - quantize: {method: rtn, targets: [NoSuchLayer]}\n")
    code, err = run([tiny_llama, "--recipe", recipe, "-o", tmp_path / "out"])
    assert code == 2 and err == f"error: {recipe}:4 stages[0].quantize.targets: matches no Linear module of this model that the stage can quantize", err


def test_quantize_after_svd_of_every_layer(tiny_llama, tmp_path):
    recipe = write(tmp_path, HEAD + "  - lowrank: {method: svd, rank: 8}\n" + RTN)
    assert_refused_both_ways(tiny_llama, recipe, tmp_path, f"{recipe}:5 stages[1].quantize.targets",
                             "already replaced by stages[0] (quantized or factorized)")


def test_a_stage_data_block_longer_than_the_model_positions(tiny_llama, tmp_path):
    # RoPE models run past max_position_embeddings without an error: distill trained on 1000-token
    # windows of a 256-position model, where the recipe's own calibration block is refused.
    text = HEAD + RTN + "  - distill:\n      steps: 2\n      data: {samples: 2, seq_len: 1000}\n"
    recipe = write(tmp_path, text)
    assert_refused_both_ways(tiny_llama, recipe, tmp_path, f"{recipe}:7 stages[1].distill.data.seq_len",
                             "1000 is longer than the model allows (256 positions)")


@pytest.mark.parametrize(
    "stages",
    [
        RTN + "  - lowrank: {method: eora, rank: 4}\n",
        RTN + "  - lowrank: {method: lora, rank: 4, steps: 2}\n",
        "  - lowrank: {method: svd, rank: 4}\n",
        RTN + "  - distill: {teacher: base, steps: 2, batch_size: 2}\n",
    ],
)
def test_a_resolved_recipe_plans_again(tiny_llama, tmp_path, stages):
    """recipe.yaml in OUT writes every key out, the keys of other methods and train modes
    included at their defaults (`alpha: null` under eora, `rank: 32` under `train: auto`):
    the checks that refuse keys a method does not read refused the output's own recipe."""
    from compressor.recipe import parse_recipe_text

    resolved = parse_recipe_text(HEAD + stages, "r.yaml").to_yaml()
    code, err = run([tiny_llama, "--recipe", write(tmp_path, resolved), "--dry-run"])
    assert code == 0, err
