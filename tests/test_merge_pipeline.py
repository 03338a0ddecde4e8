"""The merge stage end to end on tiny checkpoints: streaming output, recipes, mergekit configs."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from compressor.algorithms.merge_methods import TensorMerge, merge_method_registry
from compressor.cli import main
from compressor.merging import sources
from compressor.merging.recipe_run import run_merge_recipe
from compressor.pipeline import RunOptions
from compressor.recipe import parse_recipe_text
from tests.merge_fixtures import HUB_MERGE, perturbed_copy, recipe_text
from tests.tiny_models import build_tiny_checkpoint


@pytest.fixture(scope="session")
def merge_models(tmp_path_factory, tiny_tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge-models")
    base = build_tiny_checkpoint(root / "base", "llama", tiny_tokenizer_dir, dtype=torch.float32)
    models = {"base": base}
    for i in range(3):
        models[f"ft{i}"] = perturbed_copy(base, root / f"ft{i}", seed=i + 1)
    return models


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def merge(recipe_yaml: str, out: Path, source: str = "merge.yaml"):
    recipe = parse_recipe_text(recipe_yaml, source)
    return run_merge_recipe(recipe, RunOptions(out_dir=out, show_progress=False), echo=lambda _: None)


def ties_block(m: dict[str, Path], extra: str = "") -> str:
    return (
        f"method: ties\nbase: {m['base']}\nmodels:\n"
        f"  - {{model: {m['ft0']}, weight: 0.6, density: 0.5}}\n"
        f"  - {{model: {m['ft1']}, weight: [0.2, 0.8], density: 0.7}}\n{extra}"
    )


def test_ties_output_equals_the_method_on_whole_state_dicts(merge_models, tmp_path):
    summary = merge(recipe_text(ties_block(merge_models)), tmp_path / "out")
    out = weights(tmp_path / "out")
    base, a, b = (weights(merge_models[k]) for k in ("base", "ft0", "ft1"))
    ties = merge_method_registry().get("ties")
    layers = 2
    for name, tensor in out.items():
        t = 0.0
        if ".layers." in name:
            t = int(name.split(".layers.")[1].split(".")[0]) / (layers - 1)
        expected = ties.function(
            TensorMerge((a[name], b[name], base[name]), 2, (0.6, 0.2 + 0.6 * t, None), (0.5, 0.7, 1.0), (0.01,) * 3, True, False)
        )
        torch.testing.assert_close(tensor, expected, rtol=0, atol=0, msg=name)
    record = json.loads((tmp_path / "out" / "compression.json").read_text())
    assert record["merge"]["method"] == "ties"
    assert record["merge"]["base"] == str(merge_models["base"])
    assert [m["model"] for m in record["merge"]["models"]][:2] == [str(merge_models["ft0"]), str(merge_models["ft1"])]
    assert record["merge"]["models"][0]["weight"] == 0.6
    assert record["source"]["kind"] == "merge"
    assert [{k: v for k, v in s.items() if k != "seconds"} for s in record["stages"]] == [
        {"kind": "merge", "method": "ties", "models": 3}
    ]
    assert summary.compressed_bytes > 0
    saved = parse_recipe_text((tmp_path / "out" / "recipe.yaml").read_text(), "recipe.yaml")
    assert saved.stages[0].config == parse_recipe_text(recipe_text(ties_block(merge_models))).stages[0].config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    torch.testing.assert_close(model.model.layers[1].mlp.up_proj.weight, out["model.layers.1.mlp.up_proj.weight"])
    assert AutoTokenizer.from_pretrained(str(tmp_path / "out")).vocab_size > 0


def test_merge_only_output_has_its_model_card(merge_models, tmp_path):
    """Like every other OUT: README.md with the merge's metadata (it was missing without later stages)."""
    merge(recipe_text(ties_block(merge_models)), tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert "merge" in header["tags"] and "ties" in header["tags"]
    assert "A ties merge of" in card and str(merge_models["ft0"]) in card
    # Plain dense weights: no compressed-tensors tag, nor a claim that loading needs it.
    assert "compressed-tensors" not in header["tags"] and "pip install compressed-tensors" not in card


def test_merge_alone_claims_no_compression_ratio(merge_models, tmp_path, capsys):
    """Nothing was compressed, so neither the summary nor the card compares with an 'original'
    (they said "1.00x smaller than the original", the merged model itself)."""
    from compressor.cli import main

    (tmp_path / "m.yaml").write_text(recipe_text(ties_block(merge_models)))
    assert main(["--recipe", str(tmp_path / "m.yaml"), "-o", str(tmp_path / "out"), "-q"]) == 0
    printed = capsys.readouterr().out
    size = json.loads((tmp_path / "out" / "compression.json").read_text())["sizes"]
    assert size == {"compressed_bytes": sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors"))}
    assert f"size: {size['compressed_bytes'] / 1e6:.1f} MB\n" in printed and "smaller" not in printed
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| original |" not in card and "smaller than the original" not in card


def test_small_shards_get_an_index_and_the_same_tensors(merge_models, tmp_path):
    block = f"method: linear\nmodels:\n  - {{model: {merge_models['ft0']}, weight: 1.0}}\n  - {{model: {merge_models['ft1']}, weight: 3.0}}"
    merge(recipe_text(block), tmp_path / "one")
    merge(recipe_text(block + "\nmax_shard_size: 200KB"), tmp_path / "many")
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for shard in shards:
        assert (tmp_path / "many" / shard).stat().st_size <= 200_000 + 4096 or len(load_file(str(tmp_path / "many" / shard))) == 1
    one, many = weights(tmp_path / "one"), weights(tmp_path / "many")
    assert one.keys() == many.keys()
    for name in one:
        torch.testing.assert_close(one[name], many[name], rtol=0, atol=0)
    a, b = weights(merge_models["ft0"]), weights(merge_models["ft1"])
    torch.testing.assert_close(one["model.norm.weight"], (a["model.norm.weight"] + 3 * b["model.norm.weight"]) / 4)


def count_live_reads(monkeypatch) -> dict[str, int]:
    """Bytes of tensors read from the inputs and still alive; the most at any one time."""
    alive = {"bytes": 0, "peak": 0}

    def counting(original):
        def read(self, *args):
            tensor = original(self, *args)
            size = tensor.numel() * tensor.element_size()
            alive["bytes"] += size
            alive["peak"] = max(alive["peak"], alive["bytes"])
            weakref.finalize(tensor, lambda: alive.__setitem__("bytes", alive["bytes"] - size))
            return tensor

        return read

    monkeypatch.setattr(sources.CheckpointTensors, "read", counting(sources.CheckpointTensors.read))
    monkeypatch.setattr(sources.CheckpointTensors, "read_rows", counting(sources.CheckpointTensors.read_rows))
    return alive


def test_streaming_holds_about_one_tensor_per_input(tiny_tokenizer_dir, tmp_path, monkeypatch):
    """A 12-layer model: the reads alive at any moment never exceed one tensor per input."""
    import tests.tiny_models as tiny

    monkeypatch.setitem(tiny.CONFIGS, "deep", dict(tiny.CONFIGS["qwen2"], num_hidden_layers=12))
    base = build_tiny_checkpoint(tmp_path / "base", "deep", tiny_tokenizer_dir, dtype=torch.float32)
    ft = [perturbed_copy(base, tmp_path / f"ft{i}", seed=i) for i in range(2)]
    alive = count_live_reads(monkeypatch)
    block = f"method: ties\nbase: {base}\nmodels:\n  - {{model: {ft[0]}, weight: 0.5, density: 0.5}}\n  - {{model: {ft[1]}, weight: 0.5, density: 0.5}}"
    merge(recipe_text(block), tmp_path / "out")
    tensors = weights(base)
    largest = max(t.numel() * t.element_size() for t in tensors.values())
    model_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert len(tensors) > 100
    assert alive["peak"] <= 3 * largest
    assert alive["peak"] < model_bytes / 3
    assert alive["bytes"] == 0
    record = json.loads((tmp_path / "out" / "compression.json").read_text())
    assert record["merge"]["peak_tensor_bytes"] <= 4 * largest


def test_mergekit_config_equals_the_native_recipe(merge_models, tmp_path, capsys):
    m = merge_models
    mergekit_yaml = f"""merge_method: slerp
base_model: {m['base']}
models:
  - model: {m['base']}
  - model: {m['ft2']}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
"""
    native = f"""method: slerp
base: {m['base']}
models:
  - {{model: {m['base']}}}
  - {{model: {m['ft2']}}}
t:
  - {{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}}
  - {{filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}}
  - {{value: 0.5}}
dtype: float32
"""
    # mergekit's README writes this slerp with one whole-model slice: the same merge.
    sliced_yaml = mergekit_yaml.replace(
        f"models:\n  - model: {m['base']}\n  - model: {m['ft2']}\n",
        f"slices:\n  - sources:\n      - {{model: {m['base']}, layer_range: [0, 2]}}\n      - {{model: {m['ft2']}, layer_range: [0, 2]}}\n",
    )
    assert "slices" in sliced_yaml
    (tmp_path / "sliced.yaml").write_text(sliced_yaml)
    assert main(["merge", str(tmp_path / "sliced.yaml"), str(tmp_path / "sliced"), "-q"]) == 0
    (tmp_path / "mk.yaml").write_text(mergekit_yaml)
    (tmp_path / "native.yaml").write_text(recipe_text(native))
    # OUT as a second argument, as `mergekit-yaml CONFIG OUT` takes it; -o elsewhere must agree.
    assert main(["merge", str(tmp_path / "mk.yaml"), str(tmp_path / "c"), "-o", str(tmp_path / "d"), "-q"]) == 2
    assert "two output folders" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "mk.yaml"), str(tmp_path / "a"), "-q"]) == 0
    assert main(["merge", str(tmp_path / "native.yaml"), "-o", str(tmp_path / "b"), "-q"]) == 0
    a, b, sliced = weights(tmp_path / "a"), weights(tmp_path / "b"), weights(tmp_path / "sliced")
    assert a.keys() == b.keys() == sliced.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
        torch.testing.assert_close(sliced[name], b[name], rtol=0, atol=0)
    base, ft2 = weights(m["base"]), weights(m["ft2"])
    # layer 1 of 2 sits at t=1: attention takes the fine-tune, the MLP keeps the base.
    torch.testing.assert_close(a["model.layers.1.self_attn.q_proj.weight"], ft2["model.layers.1.self_attn.q_proj.weight"])
    torch.testing.assert_close(a["model.layers.1.mlp.up_proj.weight"], base["model.layers.1.mlp.up_proj.weight"])


def test_merge_then_gptq_in_one_recipe(merge_models, tmp_path):
    m = merge_models
    text = recipe_text(
        ties_block(m),
        extra="  - quantize: {method: gptq, weights: {bits: 4, group_size: 32}}\ncalibration: {samples: 4, seq_len: 32}\n",
    )
    (tmp_path / "r.yaml").write_text(text)
    assert main(["--recipe", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out"), "-q", "--no-perplexity"]) == 0
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    record = json.loads((out / "compression.json").read_text())
    assert record["merge"]["method"] == "ties" and record["source"]["kind"] == "merge"
    assert [(s["kind"], s["method"]) for s in record["stages"]] == [("merge", "ties"), ("quantize", "gptq")]
    assert record["stages"][0]["models"] == 3 and record["stages"][0]["seconds"] >= 0
    assert record["modules"]["model.layers.0.mlp.up_proj"]["method"] == "gptq"
    # The card written beside the checkpoint, and the one `compress push` builds, both tell of the merge.
    card = (out / "README.md").read_text()
    header = yaml.safe_load(card.split("---\n")[1])
    assert {"merge", "ties", "quantize", "gptq"} <= set(header["tags"])
    assert "merge (ties), then quantize (gptq)" in card
    assert f"a ties merge of `{m['base']}` (base), `{m['ft0']}` and `{m['ft1']}`" in card
    from compressor.hub import plan_upload

    plan = plan_upload(out, "me/merged", base_model=["org/base"])
    pushed = next(f.content for f in plan.files if f.path_in_repo == "README.md").decode()
    header = yaml.safe_load(pushed.split("---\n")[1])
    assert header["base_model"] == "org/base" and header["base_model_relation"] == "merge"
    assert {"merge", "ties"} <= set(header["tags"])
    assert not list(tmp_path.glob(".out.merged-*"))  # the merged staging folder is gone
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as handle:
        assert any(k.endswith("weight_packed") for k in handle.keys())


def test_linear_ignores_a_base_not_listed_under_models(merge_models, tmp_path, monkeypatch):
    """README: `linear` ignores `base` unless it is listed in `models`; the base is never read."""
    from compressor.merging import engine

    models = f"models:\n  - {{model: {merge_models['ft0']}, weight: 1.0}}\n  - {{model: {merge_models['ft1']}, weight: 3.0}}"
    merge(recipe_text(f"method: linear\n{models}"), tmp_path / "plain")
    opened: list[str] = []
    real_open = engine.open_input
    monkeypatch.setattr(engine, "open_input", lambda reference, **kw: opened.append(reference) or real_open(reference, **kw))
    merge(recipe_text(f"method: linear\nbase: {merge_models['base']}\n{models}"), tmp_path / "with-base")
    assert opened == [str(merge_models["ft0"]), str(merge_models["ft1"])]
    plain, with_base = weights(tmp_path / "plain"), weights(tmp_path / "with-base")
    for name in plain:
        torch.testing.assert_close(with_base[name], plain[name], rtol=0, atol=0)
    record = json.loads((tmp_path / "with-base" / "compression.json").read_text())["merge"]
    assert record["base"] is None and record["ignored_base"] == str(merge_models["base"])
    assert [m["model"] for m in record["models"]] == [str(merge_models["ft0"]), str(merge_models["ft1"])]
    assert record["tokenizer_source"] == str(merge_models["ft0"])  # the first model's, not the ignored base's

    # Listed under `models`, the base is averaged like any other input.
    listed = f"{models}\n  - {{model: {merge_models['base']}, weight: 4.0}}"
    merge(recipe_text(f"method: linear\nbase: {merge_models['base']}\n{listed}"), tmp_path / "listed")
    a, b, base = (weights(merge_models[k])["model.norm.weight"] for k in ("ft0", "ft1", "base"))
    torch.testing.assert_close(weights(tmp_path / "listed")["model.norm.weight"], (a + 3 * b + 4 * base) / 8)
    assert json.loads((tmp_path / "listed" / "compression.json").read_text())["merge"]["base"] == str(merge_models["base"])


def test_linear_tokenizer_source_base_takes_the_listed_base_wherever_it_is_listed(merge_models, tmp_path):
    marked = perturbed_copy(merge_models["base"], tmp_path / "marked-base", seed=5)
    tokenizer_config = json.loads((marked / "tokenizer_config.json").read_text())
    (marked / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "model_max_length": 77}))
    block = (
        f"method: linear\nbase: {marked}\nmodels:\n  - {{model: {merge_models['ft0']}, weight: 1.0}}\n"
        f"  - {{model: {marked}, weight: 1.0}}\ntokenizer_source: base"
    )
    merge(recipe_text(block), tmp_path / "out")
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["model_max_length"] == 77


def test_lora_input_is_merged_into_its_model_first(merge_models, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(merge_models["ft0"]))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    expected = peft_model.merge_and_unload().state_dict()
    reference = f"{merge_models['ft0']}+{tmp_path / 'adapter'}"
    merge(recipe_text(f"method: linear\nmodels:\n  - {{model: '{reference}', weight: 1.0}}"), tmp_path / "out")
    out = weights(tmp_path / "out")
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(out[name], expected[name])
    assert not torch.equal(out[name], weights(merge_models["ft0"])[name])
    record = json.loads((tmp_path / "out" / "compression.json").read_text())
    assert record["merge"]["models"][0]["adapter"] == str(tmp_path / "adapter")


def test_tokenizer_source_aligns_a_smaller_vocabulary(merge_models, tmp_path):
    """A model whose embeddings have fewer rows: rows are matched by token string."""
    from safetensors.torch import save_file

    small = perturbed_copy(merge_models["base"], tmp_path / "small", seed=9)
    tensors = load_file(str(small / "model.safetensors"))
    keep = 300
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][:keep].clone()
    save_file(tensors, str(small / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((small / "config.json").read_text())
    config["vocab_size"] = keep
    (small / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((small / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"] = {k: v for k, v in tokenizer["model"]["vocab"].items() if v < keep}
    tokenizer["model"]["merges"] = []
    (small / "tokenizer.json").write_text(json.dumps(tokenizer))

    block = f"method: task_arithmetic\nbase: {merge_models['base']}\nmodels:\n  - {{model: {small}, weight: 1.0}}"
    with pytest.raises(Exception, match="vocabulary differs"):
        merge(recipe_text(block), tmp_path / "refused")
    merge(recipe_text(block + "\ntokenizer_source: base"), tmp_path / "out")
    out = weights(tmp_path / "out")["model.embed_tokens.weight"]
    base = weights(merge_models["base"])["model.embed_tokens.weight"]
    assert out.shape == base.shape
    torch.testing.assert_close(out[:keep], tensors["model.embed_tokens.weight"])  # base + 1.0 * (small - base)
    torch.testing.assert_close(out[keep:], base[keep:])  # tokens the small model lacks: the base's rows


def test_elementwise_methods_stream_row_slices(merge_models, tmp_path, monkeypatch):
    """linear / task_arithmetic read big tensors a slice of rows at a time; same result."""
    from compressor.merging import engine

    block = (
        f"method: task_arithmetic\nbase: {merge_models['base']}\nmodels:\n"
        f"  - {{model: {merge_models['ft0']}, weight: 0.7}}\n  - {{model: {merge_models['ft1']}, weight: 0.4}}"
    )
    merge(recipe_text(block), tmp_path / "whole")
    monkeypatch.setattr(engine, "CHUNK_BYTES", 4096)
    alive = count_live_reads(monkeypatch)
    merge(recipe_text(block), tmp_path / "sliced")
    whole, sliced = weights(tmp_path / "whole"), weights(tmp_path / "sliced")
    for name in whole:
        torch.testing.assert_close(sliced[name], whole[name], rtol=0, atol=0)
    embed = whole["model.embed_tokens.weight"]
    assert alive["peak"] <= 3 * 2 * 4096 < 3 * embed.numel() * embed.element_size()


def test_card_metadata_lists_hub_parents_as_a_merge():
    from compressor.merging.card import merge_card_metadata, merge_inputs

    record = {"merge": HUB_MERGE}
    metadata = merge_card_metadata(record)
    assert metadata["base_model"] == ["org/base", "org/math"]  # the base first, as the card lists it
    assert metadata["base_model_relation"] == "merge"
    assert "merge-ties" in metadata["tags"]
    assert [m["model"] for m in merge_inputs(record)] == ["org/base", "org/math", "/local/ft"]
    assert merge_card_metadata({"source": {}}) == {}


def test_mixed_input_dtypes_are_promoted_not_cast_to_the_reference(merge_models, tmp_path):
    """A bfloat16 base with a float32 fine-tune and no `dtype`: mergekit 0.1.5 promotes each tensor's
    inputs to their common dtype, so the merge runs, and is written, in float32 (the fine-tune is not
    rounded to bfloat16 first); config.json says float32."""
    base16 = perturbed_copy(merge_models["base"], tmp_path / "base-bf16", seed=9, scale=0.0, dtype=torch.bfloat16)
    block = f"method: task_arithmetic\nbase: {base16}\nmodels:\n  - {{model: {merge_models['ft0']}, weight: 0.5}}"
    merge(recipe_text(block), tmp_path / "out")
    out, base, ft = weights(tmp_path / "out"), weights(base16), weights(merge_models["ft0"])
    for name, tensor in out.items():
        assert tensor.dtype == torch.float32, name
        promoted = base[name].float()
        torch.testing.assert_close(tensor, promoted + 0.5 * (ft[name] - promoted), rtol=0, atol=0, msg=name)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config.get("torch_dtype", config.get("dtype")) == "float32"

    # An explicit dtype still decides: both inputs cast to bfloat16 first.
    merge(recipe_text(block + "\ndtype: bfloat16"), tmp_path / "bf16")
    assert {t.dtype for t in weights(tmp_path / "bf16").values()} == {torch.bfloat16}
