"""Bad merge input: one line naming file:line and key, exit code 2, nothing written, no weight read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compressor.cli import main
from compressor.merging import sources
from tests.merge_fixtures import perturbed_copy, recipe_text
from tests.tiny_models import build_tiny_checkpoint


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge-pair")
    base = build_tiny_checkpoint(root / "base", "llama", tiny_tokenizer_dir, dtype=torch.float32)
    return {"base": base, "a": perturbed_copy(base, root / "a", seed=1), "b": perturbed_copy(base, root / "b", seed=2)}


@pytest.fixture(autouse=True)
def no_weight_reads(monkeypatch):
    """Every refusal here must come from plan time, before any tensor is read."""

    def refuse(self, name):
        raise AssertionError(f"read {name} during a refused merge")

    monkeypatch.setattr(sources.CheckpointTensors, "read", refuse)


def refused(tmp_path: Path, capsys, text: str, *fragments: str, argv_prefix=("merge",), name="merge.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    out = tmp_path / "out"
    code = main([*argv_prefix, str(path), "-o", str(out), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    assert not out.exists()
    return err


def test_different_architecture_names_the_model(pair, tiny_qwen2, tmp_path, capsys):
    text = recipe_text(f"method: task_arithmetic\nbase: {pair['base']}\nmodels:\n  - {{model: {tiny_qwen2}, weight: 1.0}}")
    refused(tmp_path, capsys, text, "merge.yaml:7", "stages[0].merge.models[0].model", "Qwen2ForCausalLM", "differs")


def test_different_shape_names_the_first_tensor(pair, tiny_tokenizer_dir, tmp_path, capsys, monkeypatch):
    import tests.tiny_models as tiny

    monkeypatch.setitem(tiny.CONFIGS, "narrow", dict(tiny.CONFIGS["llama"], intermediate_size=128))
    narrow = build_tiny_checkpoint(tmp_path / "narrow", "narrow", tiny_tokenizer_dir, dtype=torch.float32)
    text = recipe_text(f"method: linear\nmodels:\n  - {{model: {pair['base']}, weight: 1.0}}\n  - {{model: {narrow}, weight: 1.0}}")
    err = refused(tmp_path, capsys, text, "merge.yaml:7", "models[1].model", "model.layers.0.mlp.down_proj.weight", "[96, 128]")
    assert "[96, 160]" in err


def test_tied_and_untied_embeddings_are_named_as_such(pair, tmp_path, capsys):
    """It used to read "has tensor lm_head.weight that <base> lacks", which hides the cause."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    untied = shutil.copytree(pair["a"], tmp_path / "untied")
    tensors = load_file(str(untied / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(untied / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((untied / "config.json").read_text())
    (untied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    text = recipe_text(f"method: ties\nbase: {pair['base']}\nmodels:\n  - {{model: {untied}, weight: 1.0, density: 0.5}}")
    refused(tmp_path, capsys, text, "merge.yaml:7 stages[0].merge.models[0].model: tie_word_embeddings is false here and true in")


def test_weights_summing_to_zero_with_normalize(pair, tmp_path, capsys):
    text = recipe_text(f"method: linear\nmodels:\n  - {{model: {pair['a']}, weight: 1.0}}\n  - {{model: {pair['b']}, weight: -1.0}}")
    refused(tmp_path, capsys, text, "merge.yaml:5", "stages[0].merge.models", "sum to zero")


def test_weights_summing_to_zero_only_in_some_layers(pair, tmp_path, capsys):
    block = f"method: task_arithmetic\nnormalize: true\nbase: {pair['base']}\nmodels:\n  - {{model: {pair['a']}, weight: [0.5, -1.0]}}\n  - {{model: {pair['b']}, weight: [0.5, 1.0]}}"
    refused(tmp_path, capsys, recipe_text(block), "sum to zero for model.layers.1.")


@pytest.mark.parametrize("density", ["0", "1.5", "[0.5, 0.0]"])
def test_density_outside_zero_one(pair, tmp_path, capsys, density):
    text = recipe_text(f"method: ties\nbase: {pair['base']}\nmodels:\n  - model: {pair['a']}\n    weight: 1.0\n    density: {density}")
    refused(tmp_path, capsys, text, "merge.yaml:9", "stages[0].merge.models[0].density", "density must be in (0, 1]")


def test_slerp_needs_exactly_two_models(pair, tmp_path, capsys):
    text = recipe_text(f"method: slerp\nbase: {pair['base']}\nt: 0.5\nmodels:\n  - {{model: {pair['a']}}}\n  - {{model: {pair['b']}}}")
    refused(tmp_path, capsys, text, "merge.yaml:7", "stages[0].merge.models", "exactly two models")


def test_slerp_needs_t(pair, tmp_path, capsys):
    text = recipe_text(f"method: slerp\nbase: {pair['base']}\nmodels:\n  - {{model: {pair['a']}}}")
    refused(tmp_path, capsys, text, "stages[0].merge.t", "needs `t`")


def test_model_stock_needs_two_fine_tunes(pair, tmp_path, capsys):
    text = recipe_text(f"method: model_stock\nbase: {pair['base']}\nmodels:\n  - {{model: {pair['a']}}}")
    refused(tmp_path, capsys, text, "at least 2 other models")


def test_task_vectors_need_a_base_and_weights(pair, tmp_path, capsys):
    refused(tmp_path, capsys, recipe_text(f"method: ties\nmodels:\n  - {{model: {pair['a']}, weight: 1.0}}"), "stages[0].merge.method", "needs a `base`")
    text = recipe_text(f"method: ties\nbase: {pair['base']}\nmodels:\n  - {{model: {pair['a']}, density: 0.5}}")
    refused(tmp_path, capsys, text, "stages[0].merge.models[0].weight", "needs a weight")


def test_unknown_method_and_missing_model(pair, tmp_path, capsys):
    refused(tmp_path, capsys, recipe_text(f"method: tie\nmodels:\n  - {{model: {pair['a']}}}"), "merge.yaml:4", "did you mean 'ties'")
    text = recipe_text(f"method: linear\nmodels:\n  - {{model: {tmp_path / 'nope'}, weight: 1.0}}")
    refused(tmp_path, capsys, text, "merge.yaml:6", "models[0].model", "model path not found")


def test_merge_must_be_first_and_takes_no_model(pair, tmp_path, capsys):
    merge_then = recipe_text(f"method: linear\nmodels:\n  - {{model: {pair['a']}, weight: 1.0}}")
    refused(tmp_path, capsys, merge_then, "leave MODEL out", argv_prefix=(str(pair["a"]), "--recipe"))
    second = "name: x\nstages:\n  - quantize: {method: rtn}\n  - merge:\n      method: linear\n      models: [{model: " + str(pair["a"]) + ", weight: 1.0}]\n"
    refused(tmp_path, capsys, second, "merge.yaml:4", "stages[1].merge", "first stage", argv_prefix=(str(pair["a"]), "--recipe"))
    plain = "name: x\nstages:\n  - quantize: {method: rtn}\n"
    (tmp_path / "plain.yaml").write_text(plain)
    assert main(["--recipe", str(tmp_path / "plain.yaml"), "-o", str(tmp_path / "out"), "-q"]) == 2
    assert "MODEL is required" in capsys.readouterr().err


def test_mergekit_configs_refuse_what_they_cannot_translate(pair, tmp_path, capsys):
    # One whole-model slice is a `models` merge; anything that stacks or drops layers is refused.
    source = f"      - model: {pair['a']}\n        layer_range: [0, 1]\n        parameters: {{weight: 1}}\n"
    slices = f"merge_method: linear\nslices:\n  - sources:\n{source}"
    refused(tmp_path, capsys, slices, "merge.yaml:5 slices[0].sources[0].layer_range: layer_range [0, 1] does not cover the models' 2 layers")
    refused(tmp_path, capsys, slices + f"  - sources:\n{source}", "merge.yaml:2 slices: only one slice covering every layer")
    mixed = slices + source.replace("[0, 1]", "[1, 2]")
    refused(tmp_path, capsys, mixed, "merge.yaml:8 slices[0].sources[1].layer_range: layer_range [1, 2]: every source must cover the same layers")
    refused(tmp_path, capsys, "merge_method: linear\nmodules: {}\n", "merge.yaml:2 modules: `modules` configs are not supported")
    unknown_source = f"merge_method: linear\nmodels:\n  - model: {pair['a']}\n    parameters: {{weight: 1.0}}\ntokenizer_source: other\n"
    refused(tmp_path, capsys, unknown_source, "merge.yaml:5", "tokenizer_source must be 'base', 'union' or one of the models")
    bad_density = f"merge_method: ties\nbase_model: {pair['base']}\nmodels:\n  - model: {pair['a']}\n    parameters:\n      weight: 1.0\n      density: 2.0\n"
    refused(tmp_path, capsys, bad_density, "merge.yaml:7 models[0].parameters.density: density must be in (0, 1]")
    # Errors name the mergekit key that was written, not the recipe key it became.
    unknown_method = f"merge_method: frankenmerge\nmodels:\n  - model: {pair['a']}\n"
    refused(tmp_path, capsys, unknown_method, "merge.yaml:1 merge_method: unknown merge method 'frankenmerge'")
    bad_weight = f"merge_method: linear\nmodels:\n  - model: {pair['a']}\n    parameters: {{weight: abc}}\n"
    refused(tmp_path, capsys, bad_weight, "merge.yaml:4 models[0].parameters.weight: must be a number, got 'abc'")


def test_mergekit_config_errors_found_after_parsing_name_the_mergekit_keys(pair, tmp_path, capsys):
    """Checks made once inputs are resolved (plan time) name the key as the mergekit file spells it."""
    a, base, missing = pair["a"], pair["base"], tmp_path / "missing"
    twice = f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n  - model: {a}\n    parameters: {{weight: 1}}\n"
    refused(tmp_path, capsys, twice, "merge.yaml:5 models[1].model: ", "listed twice")
    not_found = f"merge_method: ties\nbase_model: {missing}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n"
    refused(tmp_path, capsys, not_found, "merge.yaml:2 base_model: model path not found")
    zero = f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n  - model: {base}\n    parameters: {{weight: -1}}\n"
    refused(tmp_path, capsys, zero, "merge.yaml:2 models: the weights sum to zero")
    # Keys the file leaves out are named where mergekit reads them.
    no_weight = f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{density: 0.5}}\n"
    refused(tmp_path, capsys, no_weight, "merge.yaml:4 models[0].parameters.weight: ties needs a weight")
    no_t = f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {a}\n"
    refused(tmp_path, capsys, no_t, "merge.yaml:1 parameters.t: slerp needs `t`")


def test_merge_only_recipe_refuses_evaluate_and_checks_push_before_merging(pair, tmp_path, capsys, monkeypatch):
    """Both keys were silently ignored by a recipe whose only stage is the merge."""
    block = f"method: linear\nmodels:\n  - {{model: {pair['a']}, weight: 1.0}}"
    evaluate = recipe_text(block, extra="evaluate: {tasks: [perplexity], limit: 2}\n")
    refused(tmp_path, capsys, evaluate, "merge.yaml:7 evaluate: ", "this recipe only merges", argv_prefix=("--recipe",))
    (tmp_path / "e.yaml").write_text(evaluate)
    assert main(["--recipe", str(tmp_path / "e.yaml"), "--dry-run"]) == 2
    assert "e.yaml:7 evaluate: " in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    push = recipe_text(block, extra="output: {push_to_hub: org/merged}\n")
    refused(tmp_path, capsys, push, "push", "HF_HUB_OFFLINE", argv_prefix=("--recipe",))


@pytest.mark.parametrize(
    "block, located",
    [
        # A recipe: the key as written.
        ("method: task_arithmetic\nbase: BASE\nmodels:\n  - {model: A, weight: 1.0, density: 0.5}", "merge.yaml:7 stages[0].merge.models[0].density: `density` has no effect on task_arithmetic"),
        ("method: ties\nbase: BASE\nseed: 3\nmodels:\n  - {model: A, weight: 1.0, density: 0.5}", "merge.yaml:6 stages[0].merge.seed: `seed` has no effect on ties"),
        ("method: linear\nlambda: 0.5\nmodels:\n  - {model: A, weight: 1.0}", "merge.yaml:5 stages[0].merge.lambda: `lambda` has no effect on linear (linear reads weight, normalize)"),
        # The base listed under models: task vectors start from it, so its weight would change nothing.
        ("method: ties\nbase: BASE\nmodels:\n  - {model: BASE, weight: 0.3}\n  - {model: A, weight: 1.0}", "merge.yaml:7 stages[0].merge.models[0].weight: the base takes no `weight` in ties"),
    ],
)
def test_parameters_the_method_does_not_read_are_refused(pair, tmp_path, capsys, block, located):
    block = block.replace("BASE", str(pair["base"])).replace("A", str(pair["a"]))
    refused(tmp_path, capsys, recipe_text(block), located, "remove it")


@pytest.mark.parametrize("method", ["linear", "ties", "dare_linear", "slerp", "model_stock"])
def test_a_merge_outputs_resolved_recipe_plans_again(pair, method):
    """recipe.yaml in OUT writes every key out, defaults included (`density: null`, `seed: 0`):
    the unused-parameter check refused it, so `compress --recipe OUT/recipe.yaml` failed."""
    from compressor.merging.recipe_run import plan_recipe_merge
    from compressor.recipe import parse_recipe_text

    a, b, base = pair["a"], pair["b"], pair["base"]
    blocks = {
        "linear": f"method: linear\nmodels:\n  - {{model: {a}, weight: 1.0}}\n  - {{model: {b}, weight: 2.0}}",
        "ties": f"method: ties\nbase: {base}\nmodels:\n  - {{model: {a}, weight: 1.0, density: 0.5}}",
        "dare_linear": f"method: dare_linear\nbase: {base}\nmodels:\n  - {{model: {a}, weight: 1.0, density: 0.5}}\nseed: 3",
        "slerp": f"method: slerp\nbase: {base}\nmodels:\n  - {{model: {a}}}\nt: 0.3",
        "model_stock": f"method: model_stock\nbase: {base}\nmodels:\n  - {{model: {a}}}\n  - {{model: {b}}}",
    }
    recipe = parse_recipe_text(recipe_text(blocks[method]), "merge.yaml")
    saved = parse_recipe_text(recipe.to_yaml(), "saved.yaml")
    assert plan_recipe_merge(saved).method.name == method
    assert saved.sha256() == recipe.sha256()


def test_mergekit_parameters_the_method_does_not_read_are_refused(pair, tmp_path, capsys):
    """mergekit resolves only the parameters a method declares and skips the rest without a word."""
    a, b, base = pair["a"], pair["b"], pair["base"]
    stock = f"merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n"
    refused(tmp_path, capsys, stock, "merge.yaml:5 models[0].parameters.weight: `weight` has no effect on model_stock")
    slerp = f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {a}\nparameters:\n  t: 0.5\n  normalize: true\n"
    refused(tmp_path, capsys, slerp, "merge.yaml:7 parameters.normalize: `normalize` has no effect on slerp (slerp reads t)")


def test_lora_inputs_are_resolved_at_plan_time(pair, tmp_path, capsys):
    """A missing adapter used to pass `--dry-run` and fail the run with no file:line."""
    bare = tmp_path / "lora"
    bare.mkdir()
    (bare / "adapter_config.json").write_text("{}")

    def ties_with(model: str) -> str:
        return recipe_text(f"method: ties\nbase: {pair['base']}\nmodels:\n  - {{model: '{model}', weight: 1.0, density: 0.5}}")

    located = "merge.yaml:7 stages[0].merge.models[0].model: "
    for argv in (("merge",), ("merge", "--dry-run")):
        refused(tmp_path, capsys, ties_with(f"{pair['a']}+{tmp_path / 'missing'}"), located, "missing not found", argv_prefix=argv)
    refused(tmp_path, capsys, ties_with(f"{pair['a']}+org/uncached-lora"), located, "cannot fetch adapter org/uncached-lora")
    refused(tmp_path, capsys, ties_with(f"{pair['a']}+{pair['b']}"), located, "has no adapter_config.json")
    refused(tmp_path, capsys, ties_with(str(bare)), located, "is a peft adapter, not a model: write it as BASE+ADAPTER")


def test_dry_run_plans_the_merge_and_later_stages(pair, tmp_path, capsys):
    text = recipe_text(
        f"method: ties\nbase: {pair['base']}\nmodels:\n  - {{model: {pair['a']}, weight: 1.0, density: 0.5}}",
        extra="  - quantize: {method: rtn, weights: {bits: 4, group_size: 32}}\n",
    )
    (tmp_path / "r.yaml").write_text(text)
    assert main(["--recipe", str(tmp_path / "r.yaml"), "--dry-run"]) == 2  # 512-token calibration > 256 positions
    assert "calibration.seq_len: 512 (the default) is longer than the model allows (256 positions); set seq_len: 256 or less" in capsys.readouterr().err
    (tmp_path / "r.yaml").write_text(text + "calibration: {seq_len: 64}\n")
    assert main(["--recipe", str(tmp_path / "r.yaml"), "--dry-run", "-o", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "stage 1: merge (ties): 2 input models targeted" in printed and "stage 2: quantize (rtn)" in printed
    assert str(pair["base"]) in printed
    assert not (tmp_path / "out").exists()


def test_linear_with_an_unlisted_base_refuses_its_tokenizer(pair, tmp_path, capsys):
    """linear ignores an unlisted base, so `tokenizer_source: base` would name a model never read."""
    text = recipe_text(
        f"method: linear\nbase: {pair['base']}\nmodels:\n  - {{model: {pair['a']}, weight: 1.0}}\ntokenizer_source: base"
    )
    refused(tmp_path, capsys, text, "stages[0].merge.tokenizer_source", "ignores a `base`", "name one of the models")


def test_linear_dry_run_says_the_unlisted_base_is_ignored(pair, tmp_path, capsys):
    text = recipe_text(f"method: linear\nbase: {pair['base']}\nmodels:\n  - {{model: {pair['a']}, weight: 1.0}}")
    (tmp_path / "r.yaml").write_text(text)
    assert main(["--recipe", str(tmp_path / "r.yaml"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert f"skipped {pair['base']}: base ignored by linear" in printed
    assert f"{pair['a']}" in printed and "model, " in printed


def test_running_a_merge_recipe_on_a_model_through_the_api_is_refused(pair, tmp_path):
    from compressor.errors import RecipeError
    from compressor.pipeline import RunOptions, run_recipe
    from compressor.recipe import parse_recipe_text

    recipe = parse_recipe_text(recipe_text(f"method: linear\nmodels:\n  - {{model: {pair['a']}, weight: 1.0}}"), "m.yaml")
    with pytest.raises(RecipeError, match="builds the model"):
        run_recipe(str(pair["a"]), recipe, RunOptions(out_dir=tmp_path / "out", show_progress=False))
