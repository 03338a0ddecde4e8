"""Models that cannot be loaded faithfully: one line naming the file or folder, exit code 2, nothing written.

Corrupt or truncated weight files, fake GGUF files, weights that do not fit their config,
tensor names that do not match the architecture, a config that is not a causal LM, and an
empty model argument; through `compress`, `compress merge` (and --dry-run), `compress
finetune` and `compress generate`. Good checkpoints (tied embeddings, unexpected extra
tensors) must still load.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from compressor.cli import main
from compressor.errors import ModelError
from compressor.load_checks import _missing_parameters, check_loading_info, check_weight_names, planned_loading_info
from compressor.model_io import load_model, skeleton_from_config
from tests.merge_fixtures import recipe_text
from tests.tiny_models import build_tiny_checkpoint

RECIPE = "name: t\ncalibration: {samples: 4, seq_len: 32}\nstages:\n  - quantize: {method: rtn, weights: {bits: 4, group_size: 32}}\n"


def refused(capsys, argv: list, *fragments: str, out: Path | None = None) -> str:
    capsys.readouterr()  # drop what building the fixtures printed
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, err
    if out is not None:
        assert not out.exists()
    return err


@pytest.fixture
def recipe(tmp_path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    return path


def copy_of(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@pytest.fixture
def garbage_weights(tiny_llama, tmp_path) -> Path:
    model = copy_of(tiny_llama, tmp_path / "garbage")
    # A header length far beyond the file, as random bytes almost always give.
    (model / "model.safetensors").write_bytes(struct.pack("<Q", 2**40) + bytes(range(256)) * 4)
    return model


@pytest.fixture
def truncated_weights(tiny_llama, tmp_path) -> Path:
    model = copy_of(tiny_llama, tmp_path / "truncated")
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    return model


@pytest.mark.parametrize("broken, reason", [("garbage_weights", "header too large"), ("truncated_weights", "not fully covered")])
@pytest.mark.parametrize("dry_run", [False, True])
def test_corrupt_safetensors_names_the_file(broken, reason, dry_run, request, recipe, tmp_path, capsys):
    model = request.getfixturevalue(broken)
    out = tmp_path / "out"
    argv = [model, "--recipe", recipe, "-o", out, "-q"] + (["--dry-run"] if dry_run else [])
    refused(capsys, argv, f"{model / 'model.safetensors'}:", "not a readable safetensors file", reason, out=out)


@pytest.mark.parametrize("dry_run", [False, True])
def test_corrupt_safetensors_in_a_merge_names_the_key_and_the_file(garbage_weights, tiny_llama, dry_run, tmp_path, capsys):
    path = tmp_path / "merge.yaml"
    path.write_text(recipe_text(f"method: linear\nmodels:\n  - {{model: {tiny_llama}, weight: 0.5}}\n"
                                f"  - {{model: {garbage_weights}, weight: 0.5}}"))
    out = tmp_path / "out"
    argv = ["merge", path, "-o", out, "-q"] + (["--dry-run"] if dry_run else [])
    refused(capsys, argv, f"{path}:7 stages[0].merge.models[1].model:", str(garbage_weights / "model.safetensors"),
            "header too large", out=out)


def test_corrupt_safetensors_in_generate(garbage_weights, capsys):
    refused(capsys, ["generate", garbage_weights, "hello", "--max-new-tokens", "1", "--device", "cpu"],
            str(garbage_weights / "model.safetensors"), "not a readable safetensors file")


def test_corrupt_safetensors_in_finetune(garbage_weights, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello world"}\n')
    out = tmp_path / "ft"
    refused(capsys, ["finetune", garbage_weights, "--dataset", data, "--output", out, "--steps", "1"],
            str(garbage_weights / "model.safetensors"), "header too large", out=out)


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"GGUF\x03\x00\x00\x00garbage", "GGUF file is truncated"),
        # A whole header, then a metadata key whose length runs past the end of the file.
        (b"GGUF" + struct.pack("<IQQ", 3, 1, 5) + b"garbage-garbage", "cannot"),
    ],
)
@pytest.mark.parametrize("dry_run", [False, True])
def test_fake_gguf_names_the_file(content, fragment, dry_run, recipe, tmp_path, capsys):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(content)
    out = tmp_path / "out"
    argv = [fake, "--recipe", recipe, "-o", out, "-q"] + (["--dry-run"] if dry_run else [])
    refused(capsys, argv, str(fake), fragment, "GGUF file", out=out)


@pytest.mark.parametrize("dry_run", [False, True])
def test_weights_that_do_not_fit_the_config(dry_run, tiny_tokenizer_dir, recipe, tmp_path, capsys):
    # Qwen3-shaped weights (hidden 64) under a Llama config (hidden 96), as in a mixed-up folder.
    model = build_tiny_checkpoint(tmp_path / "mixed", "qwen3", tiny_tokenizer_dir)
    llama = build_tiny_checkpoint(tmp_path / "llama", "llama", tiny_tokenizer_dir)
    shutil.copy2(llama / "config.json", model / "config.json")
    out = tmp_path / "out"
    argv = [model, "--recipe", recipe, "-o", out, "-q"] + (["--dry-run"] if dry_run else [])
    err = refused(capsys, argv, f"{model}:", "do not fit config.json",
                  "model.embed_tokens.weight", "[384, 64]", "[384, 96]", out=out)
    assert "ignore_mismatched_sizes" not in err


def test_junk_pickle_with_allow_pickle(tiny_llama, recipe, tmp_path, capsys):
    model = copy_of(tiny_llama, tmp_path / "pickled")
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_text("x")
    out = tmp_path / "out"
    refused(capsys, [model, "--recipe", recipe, "-o", out, "-q", "--allow-pickle"],
            str(model / "pytorch_model.bin"), "not a PyTorch checkpoint", out=out)


@pytest.mark.parametrize("dry_run", [False, True])
def test_renamed_tensors_are_refused_not_left_random(dry_run, tiny_llama, recipe, tmp_path, capsys):
    model = copy_of(tiny_llama, tmp_path / "renamed")
    tensors = load_file(str(model / "model.safetensors"))
    save_file({f"x.{name}": t for name, t in tensors.items()}, str(model / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    argv = [model, "--recipe", recipe, "-o", out, "-q"] + (["--dry-run"] if dry_run else [])
    refused(capsys, argv, f"{model}:", "lacks", "model.embed_tokens.weight",
            "x.model.embed_tokens.weight", "model_type `llama`", out=out)


def test_renamed_tensors_in_a_merge_dry_run(tiny_llama, tmp_path, capsys):
    # Both inputs renamed alike, so the merge's own name checks agree; the base's architecture does not.
    model = copy_of(tiny_llama, tmp_path / "renamed")
    tensors = load_file(str(model / "model.safetensors"))
    save_file({f"x.{name}": t for name, t in tensors.items()}, str(model / "model.safetensors"), metadata={"format": "pt"})
    tune = copy_of(model, tmp_path / "renamed-tune")
    path = tmp_path / "merge.yaml"
    path.write_text(recipe_text(f"method: task_arithmetic\nbase: {model}\nmodels:\n  - {{model: {tune}, weight: 1.0}}"))
    refused(capsys, ["merge", path, "--dry-run", "-q"], "lacks", "model.embed_tokens.weight")


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "qwen2_moe"])
def test_planned_loading_info_agrees_with_the_load(kind, tiny_tokenizer_dir, tmp_path):
    # The header-only plan must find nothing wrong where from_pretrained finds nothing wrong,
    # including MoE experts that transformers fuses from per-expert tensors at load time.
    folder = build_tiny_checkpoint(tmp_path / kind, kind, tiny_tokenizer_dir)
    skeleton = skeleton_from_config(AutoConfig.from_pretrained(folder), trust_remote_code=False)
    planned = planned_loading_info(folder, skeleton)
    _, loaded = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True)
    assert planned["mismatched_keys"] == [] and planned["unexpected_keys"] == sorted(loaded["unexpected_keys"])
    assert _missing_parameters(skeleton, planned["missing_keys"]) == []
    check_weight_names(folder, skeleton, str(folder))
    # One shrunk tensor is caught by shape; a dropped one by name.
    tensors = load_file(str(folder / "model.safetensors"))
    name = next(n for n in tensors if n.endswith("o_proj.weight"))
    save_file({**tensors, name: tensors[name][:, :8].contiguous()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert [m[0] for m in planned_loading_info(folder, skeleton)["mismatched_keys"]] == [name]
    del tensors[name]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match=f"lacks 1 of .*e.g. {name}"):
        check_weight_names(folder, skeleton, str(folder))


def test_bert_config_is_not_a_causal_lm(tiny_llama, recipe, tmp_path, capsys):
    model = copy_of(tiny_llama, tmp_path / "bert")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "bert", "architectures": ["BertModel"]}))
    out = tmp_path / "out"
    refused(capsys, [model, "--recipe", recipe, "-o", out, "-q"], f"{model}:", "model_type `bert`",
            "not a causal language model", out=out)


def test_t5_config_is_not_a_causal_lm(tiny_llama, recipe, tmp_path, capsys):
    model = copy_of(tiny_llama, tmp_path / "t5")
    (model / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}))
    refused(capsys, [model, "--recipe", recipe, "--dry-run", "-q"], "model_type `t5`", "not a causal language model")


@pytest.mark.parametrize("empty", ["", "  "])
def test_empty_model_argument(empty, recipe, tmp_path, capsys):
    out = tmp_path / "out"
    refused(capsys, [empty, "--recipe", recipe, "-o", out, "-q"], "model argument is empty", out=out)


def test_tied_embeddings_and_extra_tensors_still_load(tiny_llama, tmp_path):
    # The tiny Llama ties lm_head to embed_tokens and stores only the latter; an extra tensor
    # the architecture has no place for is ignored with a warning, as transformers does.
    model = copy_of(tiny_llama, tmp_path / "extra")
    tensors = load_file(str(model / "model.safetensors"))
    assert "lm_head.weight" not in tensors
    save_file({**tensors, "model.extra.weight": torch.zeros(2)}, str(model / "model.safetensors"), metadata={"format": "pt"})
    loaded = load_model(str(model)).model
    reference = load_file(str(tiny_llama / "model.safetensors"))
    assert torch.equal(loaded.model.embed_tokens.weight, reference["model.embed_tokens.weight"])
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_untied_checkpoint_loads(tiny_qwen2):
    loaded = load_model(str(tiny_qwen2)).model
    reference = load_file(str(tiny_qwen2 / "model.safetensors"))
    assert torch.equal(loaded.lm_head.weight, reference["lm_head.weight"])


def test_tied_and_buffer_keys_are_not_counted_missing(tiny_llama):
    # Older transformers listed tied copies as missing; buffers the model computes are not weights.
    model = load_model(str(tiny_llama)).model
    check_loading_info(model, {"missing_keys": {"lm_head.weight", "model.rotary_emb.inv_freq"}}, "m")
    with pytest.raises(ModelError, match=r"^m: the checkpoint lacks 1 of LlamaForCausalLM's weights \(e.g. model.norm.weight\)"):
        check_loading_info(model, {"missing_keys": {"model.norm.weight"}}, "m")
