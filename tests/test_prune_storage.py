"""Sparse storage round trip, GPTQ after pruning, and bad pruning recipes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from compressor.algorithms.grid import WeightGrid, dequantize_codes, expand_groups
from compressor.algorithms.gptq import gptq_quantize
from compressor.algorithms.masks import is_nm_sparse, nm_mask, parse_nm
from compressor.cli import main
from compressor.errors import RecipeError
from compressor.kernels.sparse_linear import SparseLinear, build_sparse_linear, pack_bitmask, unpack_bitmask
from compressor.sparse_format import load_sparse_model
from tests.prune_fixtures import plan_only, prune_recipe, tiny_model

PLAIN_LOGITS = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 33, 70, 120, 7, 2]])).logits[0].float()
    assert "compressor" not in sys.modules
    print(json.dumps({"logits": logits.tolist(), "parameters": sum(p.numel() for p in model.parameters())}))
    """
)


def plain_transformers(folder: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", PLAIN_LOGITS, str(folder)], capture_output=True, text=True, cwd=folder.parent, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


IDS = torch.tensor([[1, 5, 9, 33, 70, 120, 7, 2]])


@pytest.mark.parametrize("columns", [13, 64, 96])
def test_bitmask_pack_round_trip(columns):
    keep = torch.rand(5, columns) > 0.5
    packed = pack_bitmask(keep)
    assert packed.dtype == torch.uint8 and packed.shape == (5, -(-columns // 8))
    assert torch.equal(unpack_bitmask(packed, columns), keep)
    assert int(packed[0, 0]) == sum(int(keep[0, c]) << c for c in range(min(8, columns)))  # LSB first


def test_sparse_linear_matches_dense():
    weight = torch.randn(24, 40, dtype=torch.bfloat16) * nm_mask(torch.rand(24, 40), parse_nm("2:4"))
    bias = torch.randn(24, dtype=torch.bfloat16)
    module = SparseLinear.from_dense(weight, bias)
    assert module.nnz == 24 * 20
    assert torch.equal(module.dense_weight(), weight)
    x = torch.randn(3, 40, dtype=torch.bfloat16)
    assert torch.equal(module(x), torch.nn.functional.linear(x, weight, bias))
    rebuilt = build_sparse_linear("layer", {f"layer.{k}": v for k, v in module.state_dict().items()})
    assert torch.equal(rebuilt.dense_weight(), weight) and torch.equal(rebuilt.bias, bias)


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text("name: t\ncalibration: {samples: 8, seq_len: 32}\nstages:\n" + body)
    return path


def test_sparse_checkpoint_is_smaller_and_round_trips(tiny_llama, tmp_path):
    out, dense = tmp_path / "sparse", tmp_path / "dense"
    recipe = write(tmp_path, "  - prune: {method: sparsegpt, sparsity: \"2:4\"}\n")
    assert main([str(tiny_llama), "--recipe", str(recipe), "-o", str(out), "-q", "--no-perplexity"]) == 0
    config = json.loads((out / "config.json").read_text())
    block = config["sparsity_config"]
    assert block["format"] == "sparse-bitmask" and block["global_sparsity"] == pytest.approx(0.5)
    assert block["layers"]["model.layers.0.mlp.down_proj"] == "2:4" and len(block["layers"]) == 14
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        # An empty `weight` per sparse layer, so plain transformers refuses rather than loading random values.
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight").numel() == 0
    assert "model.layers.0.mlp.down_proj.weight_bitmask" in keys
    refused = subprocess.run([sys.executable, "-c", PLAIN_LOGITS, str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert refused.returncode != 0 and "size mismatch" in refused.stdout + refused.stderr, refused.stderr[-2000:]
    record = json.loads((out / "compression.json").read_text())
    # Pruned Linear weights shrink to 9/16; embeddings stay dense.
    assert record["sizes"]["compressed_bytes"] < 0.8 * record["sizes"]["original_bytes"]

    model = load_sparse_model(out)
    assert isinstance(model.model.layers[0].mlp.down_proj, SparseLinear)
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            assert is_nm_sparse(module.dense_weight(), parse_nm("2:4")), name
    with torch.no_grad():
        ours = model(IDS).logits[0].float()

    assert main(["densify", str(out), str(dense)]) == 0
    assert "sparsity_config" not in json.loads((dense / "config.json").read_text())
    plain = plain_transformers(dense)
    assert torch.allclose(torch.tensor(plain["logits"]), ours, atol=1e-3, rtol=1e-3)


def test_dense_storage_is_plain_transformers_ready(tiny_llama, tmp_path):
    out = tmp_path / "o"
    recipe = write(tmp_path, "  - prune: {method: wanda, sparsity: 0.5, storage: dense}\n")
    assert main([str(tiny_llama), "--recipe", str(recipe), "-o", str(out), "-q", "--no-perplexity"]) == 0
    assert "sparsity_config" not in json.loads((out / "config.json").read_text())
    with safe_open(out / "model.safetensors", "pt") as f:
        weight = f.get_tensor("model.layers.1.self_attn.q_proj.weight")
    assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=0.02)
    plain_transformers(out)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_keep_mask_leaves_pruned_weights_exactly_zero(symmetric):
    torch.manual_seed(0)
    weight = torch.randn(16, 64)
    keep = nm_mask(torch.rand(16, 64), parse_nm("2:4"))
    x = torch.randn(512, 64)
    hessian = 2 * x.t() @ x / 512
    grid = WeightGrid(bits=4, symmetric=symmetric, group_size=32)
    for act_order in (True, False):
        result = gptq_quantize(weight * keep, hessian, grid, act_order=act_order, keep_mask=keep)
        zero = expand_groups(result.zero, 64) if result.zero is not None else None
        dequant = dequantize_codes(result.codes.float(), expand_groups(result.scale, 64), zero)
        assert torch.equal(dequant[~keep], torch.zeros(int((~keep).sum())))
        assert (dequant[keep] != 0).float().mean() > 0.8  # the kept weights mostly stay non-zero


def test_prune_then_gptq_recipe_keeps_the_pattern(tiny_llama, tmp_path):
    from tests.test_pipeline import in_memory_logits

    out = tmp_path / "o"
    recipe = write(
        tmp_path,
        "  - prune: {method: sparsegpt, sparsity: \"2:4\"}\n"
        "  - quantize: {method: gptq, weights: {bits: 4, group_size: 32}}\n",
    )
    assert main([str(tiny_llama), "--recipe", str(recipe), "-o", str(out), "-q", "--no-perplexity"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert "sparsity_config" not in config and config["quantization_config"]["format"] == "pack-quantized"
    from compressor.kernels.packing import unpack_codes

    with safe_open(out / "model.safetensors", "pt") as f:
        for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
            packed = f.get_tensor(f"{name}.weight_packed")
            shape = tuple(f.get_tensor(f"{name}.weight_shape").tolist())
            codes = unpack_codes(packed, 4, shape, dim=1)
            assert is_nm_sparse(codes, parse_nm("2:4")), name  # symmetric: value 0 is code 0
    plain = plain_transformers(out)
    assert torch.allclose(torch.tensor(plain["logits"]), in_memory_logits(out), atol=2e-2, rtol=2e-2)


BAD = [
    ('{method: wanda, sparsity: "3:2"}', "0 < N < M"),
    ("{method: wanda, sparsity: 1.5}", "strictly between 0 and 1"),
    ("{method: wanda, sparsity: 0}", "strictly between 0 and 1"),
    ("{method: magnitude, sparsity: {heads: 1.0}}", "strictly between 0 and 1"),
    ("{method: magnitude, sparsity: {heads: 0.2, layers: [1]}}", "exactly one of"),
    ("{method: magnitude, sparsity: {layers: auto}}", "needs count"),
    ('{method: wanda, sparsity: "2:4", schedule: owl}', "owl applies to unstructured"),
    ("{method: sparsegpt, sparsity: 0.5, block_size: 0}", "greater than 0"),
    ("{method: obs, sparsity: 0.5}", "unknown prune method 'obs'"),
]


@pytest.mark.parametrize("block,message", BAD)
def test_bad_prune_recipes_name_file_line_and_key(block, message):
    with pytest.raises(RecipeError) as caught:
        plan_only(tiny_model(), prune_recipe(block))
    assert message in caught.value.message
    assert caught.value.where == "r.yaml:3"
    assert caught.value.key.startswith("stages[0].prune")


def test_nm_on_a_width_not_divisible_by_m_is_refused_in_plan():
    model = tiny_model(intermediate_size=162)  # down_proj has 162 input columns
    with pytest.raises(RecipeError) as caught:
        plan_only(model, prune_recipe('{method: sparsegpt, sparsity: "2:4"}'))
    assert "model.layers.0.mlp.down_proj has 162 input columns" in caught.value.message
    assert caught.value.key == "stages[0].prune.sparsity" and caught.value.where == "r.yaml:3"
    plan_only(model, prune_recipe('{method: sparsegpt, sparsity: "2:4", ignore: [lm_head, down_proj]}'))


def test_dry_run_catches_bad_nm_before_loading_weights(tiny_llama, tmp_path, capsys):
    recipe = write(tmp_path, "  - prune: {method: sparsegpt, sparsity: \"2:8\"}\n  - prune: {method: wanda, sparsity: \"2:64\"}\n")
    code = main([str(tiny_llama), "--recipe", str(recipe), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "r.yaml:5 stages[1].prune.sparsity" in err and "not divisible by 64" in err


def test_evaluation_loads_a_sparse_checkpoint_with_its_real_weights(tiny_llama, tmp_path):
    """`compress eval` goes through load_for_evaluation: the sparse layers must be the pruned
    weights (SparseLinear), not the random values plain transformers would leave."""
    from compressor.evaluation.loading import load_for_evaluation

    out = tmp_path / "sparse"
    recipe = write(tmp_path, "  - prune: {method: magnitude, sparsity: 0.5}\n")
    assert main([str(tiny_llama), "--recipe", str(recipe), "-o", str(out), "-q", "--no-perplexity"]) == 0
    loaded = load_for_evaluation(str(out))
    assert isinstance(loaded.model.model.layers[0].mlp.down_proj, SparseLinear)
    with torch.no_grad():
        evaluated = loaded.model(IDS).logits[0].float()
        reference = load_sparse_model(out)(IDS).logits[0].float()
    assert torch.allclose(evaluated, reference, atol=1e-5, rtol=1e-5)


MOE_PRUNE = "name: t\ncalibration: {{samples: 4, seq_len: 32}}\nstages:\n  - prune: {{method: {method}, sparsity: {sparsity}, storage: {storage}}}\n"


def test_unstructured_pruning_reaches_the_routed_experts(tiny_qwen2_moe, tmp_path):
    # Fused experts (gate_up_proj [E, 2I, H]) are most of an MoE's weights; the prune stage used to
    # leave them dense without a word (a tiny Qwen2-MoE at "2:4" came out 1.10x smaller).
    from compressor.runtime import load
    from transformers import AutoModelForCausalLM

    dense = _compress_moe(tiny_qwen2_moe, tmp_path / "dense", "magnitude", "0.5", "dense")
    plain = AutoModelForCausalLM.from_pretrained(str(dense))
    experts = plain.model.layers[0].mlp.experts
    for fused in (experts.gate_up_proj, experts.down_proj):
        assert [round(float((w == 0).float().mean()), 3) for w in fused] == [0.5] * 8
    sparse = _compress_moe(tiny_qwen2_moe, tmp_path / "sparse", "magnitude", "0.5", "sparse")
    ids = torch.tensor([[1, 5, 9, 33, 70, 120, 7, 2]])
    with torch.no_grad():
        assert torch.equal(load(sparse)(ids).logits, plain(ids).logits)
    nm = _compress_moe(tiny_qwen2_moe, tmp_path / "nm", "sparsegpt", '"2:4"', "dense")
    gate_up = AutoModelForCausalLM.from_pretrained(str(nm)).model.layers[1].mlp.experts.gate_up_proj
    assert all(is_nm_sparse(w, parse_nm("2:4")) for w in gate_up)


def _compress_moe(model: Path, folder: Path, method: str, sparsity: str, storage: str) -> Path:
    from tests.cli_runs import compress_into

    folder.mkdir()
    return compress_into(model, MOE_PRUNE.format(method=method, sparsity=sparsity, storage=storage), folder)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_an_expert_no_calibration_token_reaches_is_pruned_by_magnitude(method, tiny_qwen2_moe, tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.cli_runs import compress_into

    # Two tokens, two experts each: most of the 8 experts of a block see none, so the calibrated
    # methods have no statistics for them (they were left dense).
    recipe = MOE_PRUNE.format(method=method, sparsity="0.5", storage="dense").replace("samples: 4, seq_len: 32", "samples: 1, seq_len: 2")
    out = compress_into(tiny_qwen2_moe, recipe, tmp_path)
    for layer in AutoModelForCausalLM.from_pretrained(str(out)).model.layers:
        assert [round(float((w == 0).float().mean()), 3) for w in layer.mlp.experts.gate_up_proj] == [0.5] * 8
    records = json.loads((out / "compression.json").read_text())["modules"]
    unseen = [name for name, record in records.items() if record.get("fallback") == "magnitude: no calibration token reached this layer"]
    assert unseen and all(".mlp.experts." in name for name in unseen)
