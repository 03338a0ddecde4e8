"""Quantizing the routed experts of an MoE model (compressor.moe_experts).

transformers 5 keeps them as fused 3-D tensors; the quantize stage splits them into one Linear
per expert, named as checkpoints name them, so they are quantized and saved in the
compressed-tensors layout that transformers' own loader (and vLLM) read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import compressor
from compressor.cli import main
from compressor.kernels.quant_linear import QuantLinear
from compressor.moe_experts import UnfusedExperts, unfuse_targeted_experts
from tests.cli_runs import assert_one_line_refusal, run_cli
from tests.tiny_models import build_tiny_checkpoint

IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 13, 64, 3, 120]])


def _recipe(folder: Path, method: str, ignore: str = "[lm_head]") -> Path:
    path = folder / f"{method}.yaml"
    path.write_text(
        "name: moe\ncalibration: {samples: 4, seq_len: 32}\nstages:\n"
        f"  - quantize: {{method: {method}, weights: {{bits: 4, group_size: 32}}, ignore: {ignore}}}\n"
    )
    return path


def _compress(source: Path, folder: Path, method: str) -> Path:
    out = folder / f"out-{method}"
    assert main([str(source), "--recipe", str(_recipe(folder, method)), "-o", str(out), "-q", "--no-perplexity"]) == 0
    return out


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("mixtral"), "mixtral", tiny_tokenizer_dir)


@pytest.mark.parametrize("kind", ["qwen2_moe", "mixtral"])
def test_unfused_experts_compute_what_the_fused_ones_do(kind, tiny_qwen2_moe, mixtral):
    source = tiny_qwen2_moe if kind == "qwen2_moe" else mixtral
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    fused = _logits(model)
    assert unfuse_targeted_experts(model, ["Linear"], ["lm_head"]) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, UnfusedExperts) and isinstance(experts[3], torch.nn.Module)
    torch.testing.assert_close(_logits(model), fused, rtol=0, atol=1e-5)  # the same matmuls, split
    if kind == "qwen2_moe":  # the state_dict names are the checkpoint's per-expert names
        with safe_open(str(source / "model.safetensors"), "pt") as handle:
            assert set(handle.keys()) == set(model.state_dict())


def test_ignored_experts_stay_fused(tiny_qwen2_moe):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_moe))
    assert unfuse_targeted_experts(model, ["Linear"], ["lm_head", "re:.*experts.*"]) == []
    assert model.model.layers[0].mlp.experts.gate_up_proj.dim() == 3


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantized_experts_save_per_expert_and_load_in_transformers(method, tiny_qwen2_moe, tmp_path):
    out = _compress(tiny_qwen2_moe, tmp_path, method)
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    assert {f"model.layers.1.mlp.experts.7.down_proj.{n}" for n in ("weight_packed", "weight_scale", "weight_shape")} <= keys
    assert not any(key.endswith("experts.7.down_proj.weight") or "gate_up_proj" in key for key in keys)
    records = json.loads((out / "compression.json").read_text())["modules"]
    assert records["model.layers.0.mlp.experts.5.up_proj"]["method"] == method

    ours = compressor.load(out)
    quantized = [name for name, module in ours.named_modules() if isinstance(module, QuantLinear)]
    assert len(quantized) == 14 + 2 * 8 * 3  # attention and shared expert (not its gate), then every expert's three
    plain = AutoModelForCausalLM.from_pretrained(str(out))  # transformers' compressed-tensors loader
    torch.testing.assert_close(_logits(plain), _logits(ours), rtol=0, atol=0.02)
    original = _logits(AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_moe)))
    assert (_logits(plain) - original).abs().max() > 0.01  # the loaded experts are the quantized ones


def test_gptq_falls_back_to_rtn_for_an_expert_no_token_reaches(tiny_qwen2_moe, tmp_path):
    # A zero router gives every expert the same score: the same two get every token.
    model = AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_moe))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.zero_()
    model.save_pretrained(str(tmp_path / "src"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "src" / name).write_bytes((tiny_qwen2_moe / name).read_bytes())
    out = _compress(tmp_path / "src", tmp_path, "gptq")
    records = json.loads((out / "compression.json").read_text())["modules"]
    experts = {name: record for name, record in records.items() if ".experts." in name}
    calibrated = sorted(name for name, record in experts.items() if record.get("fallback") is None)
    assert len(calibrated) == 2 * 2 * 3 and len(experts) == 2 * 8 * 3
    gate = next(name for name in calibrated if name.endswith("gate_proj"))
    assert experts[gate]["solved_with"] == [gate, gate.replace("gate_proj", "up_proj")]  # they share their input
    unreached = sorted(set(experts) - set(calibrated))
    assert {experts[name]["fallback"] for name in unreached} == {"rtn: no calibration token reached this layer"}
    ours = compressor.load(out)
    assert all(isinstance(ours.get_submodule(name), QuantLinear) for name in unreached)


def test_mixtral_experts_save_in_its_checkpoint_names(mixtral, tmp_path):
    out = _compress(mixtral, tmp_path, "rtn")
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert "model.layers.0.block_sparse_moe.experts.3.w2.weight_packed" in handle.keys()
        packed = [k.removesuffix(".weight_packed") for k in handle.keys() if k.endswith(".weight_packed")]
    # A reader that matches targets against the names in the file (vLLM) finds every packed layer.
    from compressed_tensors.utils.match import is_match

    config = json.loads((out / "config.json").read_text())["quantization_config"]
    targets = [t for group in config["config_groups"].values() for t in group["targets"]]
    assert len(packed) == 2 * (4 + 4 * 3)
    for name in packed:
        assert any(is_match(name, torch.nn.Linear(1, 1), t) for t in targets), name
    ours = compressor.load(out)
    assert sum(isinstance(m, QuantLinear) for m in ours.modules()) == 2 * (4 + 4 * 3)
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(str(out))), _logits(ours), rtol=0, atol=0.02)


def test_dry_run_lists_the_expert_layers(tiny_qwen2_moe, tmp_path, capsys):
    assert main([str(tiny_qwen2_moe), "--recipe", str(_recipe(tmp_path, "gptq")), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    for projection in ("gate_proj", "up_proj", "down_proj"):
        assert re.search(rf"model\.layers\.\*\.mlp\.experts\.\*\.{projection} +x16 +int4 sym group 32", listing), listing


def test_an_experts_class_that_cannot_be_unfused_is_refused(tmp_path, tiny_tokenizer_dir, capsys):
    source = build_tiny_checkpoint(tmp_path / "gpt-oss", "gpt_oss", tiny_tokenizer_dir)
    code, err = run_cli([source, "--recipe", _recipe(tmp_path, "rtn"), "--dry-run"], capsys)
    assert_one_line_refusal(code, err, "rtn.yaml", "targets", "model.layers.0.mlp.experts (GptOssExperts)", "ignore")
    code, err = run_cli([source, "--recipe", _recipe(tmp_path, "rtn", "[lm_head, 're:.*experts.*']"), "--dry-run"], capsys)
    assert code == 0, err


def test_nf4_keeps_the_experts_fused(tiny_qwen2_moe, tmp_path, capsys):
    # transformers' bitsandbytes loader reads MoE experts only as its fused tensors.
    recipe = tmp_path / "nf4.yaml"
    recipe.write_text("name: moe\ncalibration: {seq_len: 32}\nstages:\n  - quantize: {method: nf4}\n")
    assert main([str(tiny_qwen2_moe), "--recipe", str(recipe), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert "shared_expert.gate_proj" in listing and "experts.*" not in listing


def test_nf4_moe_output_runs_where_bitsandbytes_repacks_for_its_cpu_kernel(tiny_qwen2_moe, tmp_path, capsys):
    # That repack (AVX-512 BF16 CPUs, inference) takes 32 output rows at a time: the 1-row
    # shared_expert_gate stays dense, so both loaders run the model.
    import bitsandbytes as bnb

    recipe = tmp_path / "nf4.yaml"
    recipe.write_text("name: moe\ncalibration: {samples: 4, seq_len: 32}\nstages:\n  - quantize: {method: nf4}\n")
    out = tmp_path / "out"
    assert main([str(tiny_qwen2_moe), "--recipe", str(recipe), "-o", str(out), "-q", "--no-perplexity"]) == 0
    ours = compressor.load(out)
    gate = ours.get_submodule("model.layers.0.mlp.shared_expert_gate")
    assert not isinstance(gate, bnb.nn.Linear4bit) and isinstance(ours.get_submodule("model.layers.0.self_attn.q_proj"), bnb.nn.Linear4bit)
    theirs = AutoModelForCausalLM.from_pretrained(str(out))
    assert torch.isfinite(_logits(ours)).all()
    torch.testing.assert_close(_logits(theirs), _logits(ours), rtol=0, atol=0.05)


def test_offloaded_experts_are_refused_in_one_line(tiny_qwen2_moe, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli([tiny_qwen2_moe, "--recipe", _recipe(tmp_path, "rtn"), "-o", out, "-q", "--no-perplexity",
                         "--max-memory", "200KB"], capsys)
    assert_one_line_refusal(code, err, "rtn.yaml:4", "targets", "offloaded (--max-memory)", "re:.*experts.*")
    assert not out.exists()
