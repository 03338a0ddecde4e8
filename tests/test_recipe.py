"""Recipe parsing: the DESIGN.md keys parse; every error names file:line and the key path."""

from __future__ import annotations

import textwrap

import pytest

from compressor.errors import RecipeError
from compressor.recipe import builtin_recipes, load_recipe, parse_recipe_text


def parse(text: str):
    return parse_recipe_text(textwrap.dedent(text), source="r.yaml")


def error_of(text: str) -> str:
    with pytest.raises(RecipeError) as info:
        parse(text)
    return info.value.format()


GOOD = """\
name: w4
calibration:
  dataset: builtin:abstracts
  samples: 16
  seq_len: 64
  seed: 3
stages:
  - quantize:
      method: gptq
      weights: {bits: 4, group_size: 128, symmetric: true}
      activations: null
      targets: [Linear, "re:.*proj"]
      ignore: [lm_head]
      act_order: true
      dampening: 1e-2
evaluate:
  tasks: [perplexity]
output:
  format: compressed-tensors
  push_to_hub: null
"""


def test_design_keys_parse_with_defaults():
    recipe = parse(GOOD)
    assert recipe.calibration.samples == 16 and recipe.calibration.seed == 3
    (stage,) = recipe.stages
    assert stage.kind == "quantize"
    assert stage.config.method == "gptq"
    assert stage.config.weights.group_size == 128
    assert stage.config.dampening == pytest.approx(0.01)  # YAML 1.1 reads 1e-2 as a string; we read a float
    assert stage.config.block_size == 128  # default filled in


def test_resolved_recipe_round_trips_through_safe_yaml():
    recipe = parse(GOOD)
    again = parse_recipe_text(recipe.to_yaml(), source="again.yaml")
    assert again.to_dict() == recipe.to_dict()
    assert again.sha256() == recipe.sha256()
    assert "!!python" not in recipe.to_yaml()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("name: x\nstages:\n  - quantise: {method: gptq}\n", "r.yaml:3 stages[0].quantise: unknown stage 'quantise' (known: "),
        ("name: x\nstages:\n  - quantize: {method: gptqq}\n", "r.yaml:3 stages[0].quantize.method: unknown quantize method 'gptqq' (known: "),
        ("name: x\nstages:\n  - quantize:\n      method: gptq\n      weights: {bits: 5}\n", "r.yaml:5 stages[0].quantize.weights.bits: must be one of 2, 3, 4, 8, got 5"),
        ("name: x\nstages:\n  - quantize:\n      method: gptq\n      weights:\n        group_size: -128\n", "r.yaml:6 stages[0].quantize.weights.group_size: must be greater than 0, got -128"),
        ("name: x\nstages:\n  - quantize:\n      method: gptq\n      act_ordr: true\n", "r.yaml:5 stages[0].quantize.act_ordr: unknown key 'act_ordr'"),
        ("name: x\nstages:\n  - quantize:\n      method: gptq\n      act_order: 'yes'\n", "r.yaml:5 stages[0].quantize.act_order: must be true or false, got 'yes'"),
        ("name: x\nstages: []\n", "r.yaml:2 stages: List should have at least 1 item after validation, not 0"),
        ("name: x\ncalibration:\n  samples: many\nstages:\n  - quantize: {method: rtn}\n", "r.yaml:3 calibration.samples: must be an integer, got 'many'"),
        ("name: x\nstagez: []\n", "r.yaml:2 stagez: unknown key 'stagez'"),
        ("name: x\nstages:\n  - quantize: {method: rtn}\n    prune: {}\n", "r.yaml:3 stages[0]: each stage must be a mapping with exactly one key"),
        ("name: x\nstages:\n  - quantize: {method: rtn, targets: ['re:(']}\n", "r.yaml:3 stages[0].quantize.targets: invalid regex '('"),
        ("name: [unclosed\n", "r.yaml:2: not valid YAML"),
        ("name: !!python/object:os.system x\nstages: []\n", "r.yaml:1 name: YAML tag 'tag:yaml.org,2002:python/object:os.system' is not allowed"),
        ("- just\n- a list\n", "r.yaml:1: a recipe must be a YAML mapping"),
        ("name: x\nname: y\nstages: []\n", "r.yaml:2 name: duplicate key 'name'"),
        ("name: x\nstages:\n  - quantize: {method: rtn, weights: &w {bits: 4}}\n  - quantize: {method: rtn, weights: {<<: *w, bits: 8, bits: 2}}\n",
         "r.yaml:4 stages[1].quantize.weights.bits: duplicate key 'bits'"),
        ("name: x\nstages:\n  - quantize: {method: rtn, weights: &w {bits: 4}}\n  - quantize: {method: rtn, weights: {<<: *w, bitz: 8}}\n",
         "r.yaml:4 stages[1].quantize.weights.bitz: unknown key 'bitz'"),
        ("name: x\nstages:\n  - quantize: {method: rtn}\nevaluate:\n  tasks: [arc_eazy]\n", "r.yaml:5 evaluate.tasks: unknown task 'arc_eazy'; did you mean arc_easy"),
    ],
)
def test_errors_name_file_line_and_key(text, expected):
    assert error_of(text).startswith(expected)


def test_unknown_key_lists_known_keys():
    message = error_of("name: x\nstages:\n  - quantize:\n      method: rtn\n      weights: {bitz: 4}\n")
    assert "unknown key 'bitz' (known: bits, group_size, symmetric, type, observer)" in message


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe(str(tmp_path / "nope.yaml"))
    assert info.value.format() == f"{tmp_path / 'nope.yaml'}: recipe file not found"


def test_builtin_recipes_all_parse_and_describe_themselves():
    recipes = builtin_recipes()
    assert {"w4a16-gptq", "w4a16-rtn", "w8a16-gptq"} <= set(recipes)
    for path in recipes.values():
        recipe = load_recipe(str(path))
        assert recipe.description and "\n" not in recipe.description
    assert load_recipe("w4a16-gptq").stages[0].config.method == "gptq"


def test_unknown_builtin_recipe_name():
    with pytest.raises(RecipeError) as info:
        load_recipe("w5a16-gptq")
    assert "no built-in recipe 'w5a16-gptq'" in info.value.format()


def test_yaml_anchors_and_merge_keys():
    """`<<: *anchor` copies a mapping; the mapping's own keys override what it merged."""
    recipe = parse_recipe_text(textwrap.dedent("""\
        name: x
        stages:
          - quantize: {method: rtn, weights: &w {bits: 4, group_size: 32, symmetric: false}, targets: ["re:.*mlp.*"]}
          - quantize: {method: rtn, weights: {<<: *w, bits: 8}, targets: ["re:.*attn.*"]}
          - quantize: {method: rtn, weights: *w, targets: [lm_head]}
        """), "r.yaml")
    first, second, third = (stage.config.weights for stage in recipe.stages)
    assert (first.bits, first.group_size, first.symmetric) == (4, 32, False)
    assert (second.bits, second.group_size, second.symmetric) == (8, 32, False)
    assert third == first


def test_every_builtin_recipe_resolved_parses_again():
    """What `recipe.yaml` in OUT holds (every default written out) is a recipe `compress` accepts."""
    for name in builtin_recipes():
        recipe = load_recipe(name)
        again = parse_recipe_text(recipe.to_yaml(), source=f"{name}/recipe.yaml")
        assert again.to_dict() == recipe.to_dict(), name


def test_a_recipe_without_a_name_is_named_after_its_file(tmp_path):
    # DESIGN.md's merge recipe example gives no `name:`; an outside recipe written from it must run.
    path = tmp_path / "my-merge.yaml"
    path.write_text("stages:\n  - quantize: {method: rtn}\n")
    recipe = load_recipe(str(path))
    assert recipe.name == "my-merge" and recipe.to_dict()["name"] == "my-merge"
    assert parse_recipe_text("stages:\n  - quantize: {method: rtn}\n").name == "recipe"
