"""W8A8 (SmoothQuant), FP8 and NF4: math against direct computations, tiny-model runs, round
trips through save and plain transformers, and the recipe errors of the quantization formats."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from compressor.algorithms.fp8 import fp8_quantize
from compressor.algorithms.gptq import HessianAccumulator
from compressor.algorithms.smoothquant import smoothed_hessian, smoothing_scales
from compressor.cli import main
from compressor.errors import RecipeError
from compressor.kernels.w8a8_linear import ActivationScheme, W8A8Linear
from compressor.model_io import load_model
from compressor.pipeline import plan_recipe
from compressor.recipe import parse_recipe_text
from compressor.stages.base import StageContext
from compressor.stages.quantize import QuantizeStage
from tests.tiny_models import build_tiny_checkpoint

IDS = torch.tensor([[1, 5, 9, 33, 70, 120, 7, 2, 44, 13]])


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    # hidden 64 / intermediate 128: whole NF4 blocks of 64 in every Linear.
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3", tiny_tokenizer_dir)


def recipe_for(body: str, samples: int = 8, seq_len: int = 32) -> str:
    return f"name: t\ncalibration: {{samples: {samples}, seq_len: {seq_len}, seed: 0}}\nstages:\n{textwrap.indent(body, '  ')}"


def run_stages(folder: Path, recipe_text: str):
    """Load `folder`, run the recipe's stages in memory; (loaded model, stage records)."""
    from compressor.cache import cache_root
    from compressor.calibration.batches import build_calibration

    recipe = parse_recipe_text(recipe_text)
    loaded = load_model(str(folder))
    model = loaded.model
    tokens = build_calibration(recipe.calibration, loaded.tokenizer, cache_root() / "calibration")
    ctx = StageContext(tokenizer=loaded.tokenizer, calibration=lambda: tokens, device=torch.device("cpu"), show_progress=False)
    stage = QuantizeStage()
    for index, spec in enumerate(recipe.stages):
        plan = stage.plan(model, spec.config, lambda *k: recipe.where(("stages", index, "quantize", *k)))
        stage.run(model, spec.config, ctx, plan)
    return loaded, ctx.records


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(IDS).logits[0].float()


# -- kernels: per-token activation quantization, int8 product, FP8 -------------------------------


def test_w8a8_forward_matches_a_direct_per_token_computation(seeded):
    codes = torch.randint(-128, 128, (24, 40), dtype=torch.int8)
    scale = torch.rand(24, 1) * 0.01 + 1e-3
    bias = torch.randn(24)
    layer = W8A8Linear.from_codes(codes, scale, weight_type="int", activations=ActivationScheme("int", True),
                                  input_scale=None, bias=bias, dtype=torch.float32)
    x = torch.randn(2, 5, 40) * torch.linspace(0.1, 8.0, 40)  # uneven channels, like real activations
    x[0, 1] = 0.0  # an all-zero token must not divide by zero
    out = layer(x)

    xd = x.double().reshape(-1, 40)
    token_scale = xd.abs().amax(dim=1, keepdim=True) / 127
    token_scale[token_scale == 0] = 1.0
    x_codes = torch.round(xd / token_scale).clamp(-128, 127)
    assert x_codes.abs().max() == 127
    expected = (x_codes * token_scale) @ (codes.double() * scale.double()).t() + bias.double()
    expected = expected.reshape(2, 5, 24)
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[0, 1], bias)


def test_int8_matmul_is_exact_on_every_path(seeded):
    a = torch.randint(-128, 128, (7, 300), dtype=torch.int8)
    b = torch.randint(-128, 128, (11, 300), dtype=torch.int8)
    exact = (a.long() @ b.long().t()).float()
    assert torch.equal(torch._int_mm(a, b.t()).float(), exact)  # the operator W8A8Linear's int8 path uses
    assert torch.equal((a.double() @ b.double().t()).float(), exact)


def test_static_activation_scale_saturates_outliers(seeded):
    codes = torch.randint(-128, 128, (8, 16), dtype=torch.int8)
    layer = W8A8Linear.from_codes(codes, torch.full((8, 1), 0.02), weight_type="int",
                                  activations=ActivationScheme("int", False), input_scale=torch.tensor([0.05]),
                                  bias=None, dtype=torch.float32)
    x = torch.randn(3, 16)
    x[0, 0] = 100.0  # far beyond 127 * 0.05: clipped to 127
    x_codes = torch.round(x / 0.05).clamp(-128, 127)
    expected = (x_codes * 0.05) @ (codes.float() * 0.02).t()
    assert torch.allclose(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_fp8_round_trip_per_channel(seeded):
    weight = torch.randn(32, 48) * torch.logspace(-2, 1, 32)[:, None]  # rows of very different ranges
    codes, scale = fp8_quantize(weight, torch.bfloat16)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (32, 1)
    assert torch.equal(scale, scale.to(torch.bfloat16).float())  # what is saved is what was used
    assert torch.all(codes.float().abs().amax(dim=1) <= 448)
    assert torch.all(codes.float().abs().amax(dim=1) >= 440)  # the row maximum lands at the top of the grid
    restored = codes.float() * scale
    # e4m3 keeps 3 mantissa bits: relative error ≤ 2^-4 for normal values
    normal = (weight / scale).abs() >= 2 ** -6
    assert torch.all(((restored - weight).abs() / weight.abs())[normal] <= 2 ** -4 + 1e-6)
    assert torch.equal(codes.float().to(torch.float8_e4m3fn), codes)


# -- SmoothQuant math -----------------------------------------------------------------------------


def test_smoothing_scales_follow_the_formula():
    act = torch.tensor([4.0, 0.0, 0.25, 9.0])
    wmax = torch.tensor([0.5, 2.0, 1.0, 0.04])
    s = smoothing_scales(act, wmax, 0.75)
    expected = act.pow(0.75) / wmax.pow(0.25)
    assert torch.allclose(s[[0, 2, 3]], expected[[0, 2, 3]])
    assert s[1] == 1.0  # a channel never active is left alone


def test_smoothed_hessian_is_the_hessian_of_the_scaled_inputs(seeded):
    x = torch.randn(50, 12) * 3
    s = torch.rand(12) + 0.2
    direct, scaled = HessianAccumulator(12), HessianAccumulator(12)
    direct.add(x)
    scaled.add(x / s)
    assert torch.allclose(smoothed_hessian(direct.hessian, s), scaled.hessian, rtol=1e-5, atol=1e-6)


def test_smoothing_preserves_the_float_model(tiny_llama):
    """Smoothing only (activations: null): every norm→Linear group is smoothed, logits unchanged."""
    loaded = load_model(str(tiny_llama))
    loaded.model.float()
    before = logits(loaded.model)
    norms_before = {n: p.detach().clone() for n, p in loaded.model.named_parameters() if "norm" in n}
    body = "- quantize: {method: smoothquant, smoothing_strength: 0.8, activations: null}\n"
    from compressor.cache import cache_root
    from compressor.calibration.batches import build_calibration

    recipe = parse_recipe_text(recipe_for(body))
    tokens = build_calibration(recipe.calibration, loaded.tokenizer, cache_root() / "calibration")
    ctx = StageContext(tokenizer=loaded.tokenizer, calibration=lambda: tokens, device=torch.device("cpu"), show_progress=False)
    stage = QuantizeStage()
    config = recipe.stages[0].config
    stage.run(loaded.model, config, ctx, stage.plan(loaded.model, config, lambda *k: {}))
    after = logits(loaded.model)
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4)
    changed = [n for n, p in loaded.model.named_parameters() if n in norms_before and not torch.equal(p, norms_before[n])]
    assert any("input_layernorm" in n for n in changed) and any("post_attention_layernorm" in n for n in changed)
    smoothed = {name: rec["smoothed_by"] for name, rec in ctx.records.items()}
    assert smoothed["model.layers.0.self_attn.q_proj"] == "model.layers.0.input_layernorm"
    assert smoothed["model.layers.1.mlp.up_proj"] == "model.layers.1.post_attention_layernorm"
    assert smoothed["model.layers.0.self_attn.o_proj"] is None and smoothed["model.layers.0.mlp.down_proj"] is None
    assert all(isinstance(loaded.model.get_submodule(n), nn.Linear) for n in smoothed)


# -- whole methods on tiny models, saved and reloaded with plain transformers ----------------------

RELOAD = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    for folder in sys.argv[1:]:
        model = AutoModelForCausalLM.from_pretrained(folder)
        with torch.no_grad():
            logits = model(torch.tensor([%s])).logits[0].float()
        print(json.dumps({"logits": logits.tolist(), "classes": sorted({type(m).__name__ for m in model.modules()})}))
    assert "compressor" not in sys.modules
    """ % IDS[0].tolist()
)


def reload_with_transformers(*folders: Path) -> list[tuple[torch.Tensor, list[str]]]:
    """Logits and module classes of each folder loaded by plain transformers (one subprocess)."""
    out = subprocess.run([sys.executable, "-c", RELOAD, *map(str, folders)], capture_output=True, text=True,
                         cwd=folders[0].parent, check=True)
    rows = [json.loads(line) for line in out.stdout.strip().splitlines() if line.startswith("{")]
    assert len(rows) == len(folders)
    return [(torch.tensor(row["logits"]), row["classes"]) for row in rows]


def save_like_the_pipeline(loaded, folder: Path) -> dict:
    from compressor.formats import write_quantization_config

    loaded.model.save_pretrained(str(folder), safe_serialization=True)
    write_quantization_config(loaded.model, folder)
    return json.loads((folder / "config.json").read_text())["quantization_config"]


CT_CASES = {
    # recipe body → (format, expected input_activations)
    "- quantize: {method: smoothquant+gptq}\n": ("int-quantized", {"type": "int", "strategy": "token", "dynamic": True}),
    "- quantize: {method: fp8, activations: {type: float, dynamic: false}}\n": (
        "float-quantized", {"type": "float", "strategy": "tensor", "dynamic": False}),
}


def test_w8a8_and_fp8_save_as_compressed_tensors_and_reload(tiny_llama, tmp_path):
    folders, ours = [], []
    for index, (body, (fmt, act)) in enumerate(CT_CASES.items()):
        loaded, records = run_stages(tiny_llama, recipe_for(body))
        layers = {n: m for n, m in loaded.model.named_modules() if isinstance(m, W8A8Linear)}
        assert len(layers) == 14 and "lm_head" not in layers
        ours.append(logits(loaded.model))
        folders.append(tmp_path / f"out{index}")
        qconfig = save_like_the_pipeline(loaded, folders[-1])
        assert qconfig["format"] == fmt
        (group,) = qconfig["config_groups"].values()
        assert group["format"] == fmt
        assert group["weights"]["strategy"] == "channel" and group["weights"]["num_bits"] == 8
        assert {k: group["input_activations"][k] for k in act} == act
        if act["dynamic"] is False:
            assert all(m.input_scale is not None and m.input_scale.item() > 0 for m in layers.values())
        else:
            assert all(rec["smoothed_by"] is not None for n, rec in records.items() if n.endswith(("q_proj", "gate_proj")))
    for mine, (theirs, _) in zip(ours, reload_with_transformers(*folders)):
        assert torch.allclose(theirs, mine, atol=0.05, rtol=0.05)
        assert (theirs - mine).abs().mean() < 0.01


def test_w8a8_smoothquant_stays_close_to_float(tiny_llama):
    base = load_model(str(tiny_llama))
    reference = logits(base.model)
    loaded, _ = run_stages(tiny_llama, recipe_for("- quantize: {method: smoothquant}\n"))
    quantized = logits(loaded.model)
    assert (quantized - reference).norm() / reference.norm() < 0.05
    assert not torch.equal(quantized, reference)


def _nf4_reference_dequantize(weight: torch.Tensor, state) -> torch.Tensor:
    """NF4 by hand: two codes per byte (high nibble first), codebook lookup, one absmax per 64."""
    packed = weight.reshape(-1)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1).long()
    absmax = state.absmax
    if state.nested:
        nested = state.state2
        blocks = nested.code[absmax.long()] * nested.absmax.repeat_interleave(nested.blocksize)[: absmax.numel()]
        absmax = blocks + state.offset
    values = state.code[codes].float().reshape(-1, 64) * absmax.float()[:, None]
    return values.reshape(state.shape)


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_codebook_and_blocks_match_bitsandbytes(tiny_qwen3, double_quant):
    import bitsandbytes as bnb

    original = load_model(str(tiny_qwen3)).model.get_submodule("model.layers.0.mlp.up_proj").weight.detach().float()
    body = f"- quantize: {{method: nf4, double_quant: {str(double_quant).lower()}}}\n"
    loaded, records = run_stages(tiny_qwen3, recipe_for(body))
    layer = loaded.model.get_submodule("model.layers.0.mlp.up_proj")
    assert isinstance(layer, bnb.nn.Linear4bit)
    state = layer.weight.quant_state
    assert state.blocksize == 64 and state.quant_type == "nf4" and bool(state.nested) == double_quant
    # The NF4 codebook: 16 quantiles of N(0, 1) scaled to [-1, 1], with an exact zero.
    assert state.code.numel() == 16 and state.code[0] == -1.0 and state.code[-1] == 1.0 and (state.code == 0).sum() == 1
    theirs = bnb.functional.dequantize_4bit(layer.weight.data, state).float()
    ours = _nf4_reference_dequantize(layer.weight.data, state)
    assert torch.allclose(ours, theirs, rtol=1e-2, atol=1e-6)
    block_max = original.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
    assert torch.all((theirs - original).reshape(-1, 64).abs() <= block_max * 0.17 + 1e-6)  # half the widest NF4 gap
    assert records["model.layers.0.mlp.up_proj"]["double_quant"] is double_quant


def test_nf4_saves_the_bitsandbytes_serialization_transformers_loads(tiny_qwen3, tmp_path):
    loaded, _ = run_stages(tiny_qwen3, recipe_for("- quantize: {method: nf4, double_quant: true}\n"))
    ours = logits(loaded.model)
    config = save_like_the_pipeline(loaded, tmp_path / "nf4")
    assert config["quant_method"] == "bitsandbytes" and config["bnb_4bit_quant_type"] == "nf4"
    assert config["bnb_4bit_use_double_quant"] is True and config["load_in_4bit"] is True
    from safetensors import safe_open

    with safe_open(str(tmp_path / "nf4" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    prefix = "model.layers.1.self_attn.o_proj.weight"
    assert {prefix, f"{prefix}.absmax", f"{prefix}.quant_map", f"{prefix}.nested_absmax",
            f"{prefix}.quant_state.bitsandbytes__nf4"} <= keys
    ((theirs, classes),) = reload_with_transformers(tmp_path / "nf4")
    assert "Linear4bit" in classes
    assert torch.allclose(theirs, ours, atol=1e-2, rtol=1e-2)


NF4_BODY = "- quantize: {method: nf4, ignore: [lm_head]}\n"


def _direct_nf4(weight: torch.Tensor) -> torch.Tensor:
    """`weight` through bitsandbytes' own NF4 round trip (blocks of 64, no double quantization)."""
    import bitsandbytes as bnb

    codes, state = bnb.functional.quantize_4bit(weight, quant_type="nf4", blocksize=64)
    return bnb.functional.dequantize_4bit(codes, state).float()


def saved_nf4_weights(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Weight name → (dequantized weight, stored absmax) of every NF4 layer in the folder, read with
    bitsandbytes' ``QuantState.from_dict`` (what transformers' loader uses)."""
    from bitsandbytes.functional import QuantState, dequantize_4bit
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "model.safetensors"))
    found = {}
    for key in tensors:
        if key.endswith(".weight.absmax"):
            name = key.removesuffix(".absmax")
            state = QuantState.from_dict({k: v for k, v in tensors.items() if k.startswith(name + ".")}, torch.device("cpu"))
            found[name] = (dequantize_4bit(tensors[name], state).float(), tensors[key])
    return found


@pytest.fixture(scope="module")
def nf4_after_perplexity(tiny_qwen3, tmp_path_factory) -> Path:
    """`compress` with nf4 and the held-out perplexity on: no-grad forwards run before the save (on a
    CPU with AVX-512 BF16 they are what makes bitsandbytes repack the weights)."""
    folder = tmp_path_factory.mktemp("nf4-perplexity")
    (folder / "nf4.yaml").write_text(recipe_for(NF4_BODY))
    out = folder / "out"
    assert main([str(tiny_qwen3), "--recipe", str(folder / "nf4.yaml"), "-o", str(out), "-q"]) == 0
    assert json.loads((out / "compression.json").read_text())["perplexity"]["compressed"] is not None
    return out


@pytest.fixture(scope="module")
def nf4_transformers_logits(nf4_after_perplexity) -> torch.Tensor:
    ((theirs, classes),) = reload_with_transformers(nf4_after_perplexity)
    assert "Linear4bit" in classes
    return theirs


def test_nf4_saved_after_perplexity_is_what_bitsandbytes_quantizes(tiny_qwen3, nf4_after_perplexity):
    original = load_model(str(tiny_qwen3)).model.state_dict()
    saved = saved_nf4_weights(nf4_after_perplexity)
    assert len(saved) == 14
    for name, (weight, absmax) in saved.items():
        rows, cols = original[name].shape
        # bitsandbytes' CPU layout would be [cols / 64, rows] in bf16
        assert absmax.shape == (rows * cols // 64,) and absmax.dtype == torch.float32, name
        assert torch.equal(weight, _direct_nf4(original[name])), name


def test_nf4_saved_after_perplexity_computes_the_direct_quantization(tiny_qwen3, nf4_transformers_logits):
    dense = load_model(str(tiny_qwen3)).model
    reference = logits(dense)
    with torch.no_grad():
        for name, module in dense.named_modules():
            if isinstance(module, nn.Linear) and name != "lm_head":
                module.weight.copy_(_direct_nf4(module.weight))
    expected = logits(dense)
    # 0.4 % here (bf16 arithmetic); 2.6 % with the absmaxes of the wrong blocks.
    assert (nf4_transformers_logits - expected).abs().max() <= 0.01 * expected.abs().max()
    assert (nf4_transformers_logits - reference).norm() <= 0.15 * reference.norm()  # NF4's own error: 10 %


def test_compressor_load_gives_the_model_transformers_builds(nf4_after_perplexity, nf4_transformers_logits, tmp_path):
    import bitsandbytes as bnb

    import compressor

    model = compressor.load(nf4_after_perplexity)
    layers = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 14 and model.compressed_formats == dict.fromkeys(layers, "bitsandbytes-nf4")
    assert torch.equal(logits(model), nf4_transformers_logits)
    # Saving it after that forward (a CPU repack where bitsandbytes does one) writes the same NF4 tensors.
    model.save_pretrained(str(tmp_path / "again"))
    again = saved_nf4_weights(tmp_path / "again")
    for name, (weight, absmax) in saved_nf4_weights(nf4_after_perplexity).items():
        assert again[name][1].shape == absmax.shape and torch.allclose(again[name][0], weight, rtol=2**-8, atol=0), name


@pytest.mark.parametrize("double_quant", [False, True])
def test_a_cpu_repack_is_undone_before_saving(tiny_qwen3, double_quant, tmp_path):
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    body = f"- quantize: {{method: nf4, double_quant: {str(double_quant).lower()}, ignore: [lm_head]}}\n"
    loaded, _ = run_stages(tiny_qwen3, recipe_for(body))
    save_like_the_pipeline(loaded, tmp_path / "canonical")
    for module in loaded.model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # What Linear4bit.forward does on a CPU with AVX-512 BF16, done here on any CPU.
            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu(
                module.weight.data, module.weight.quant_state)
    save_like_the_pipeline(loaded, tmp_path / "repacked")
    canonical, repacked = saved_nf4_weights(tmp_path / "canonical"), saved_nf4_weights(tmp_path / "repacked")
    assert len(repacked) == 14
    for name, (weight, absmax) in canonical.items():
        assert repacked[name][1].shape == absmax.shape and repacked[name][1].dtype == absmax.dtype, name
        # The repack rounded the absmaxes to bf16 (and, double-quantized, they are quantized again).
        tolerance = 2e-2 if double_quant else 2**-8
        assert torch.allclose(repacked[name][0], weight, rtol=tolerance, atol=0), name


def test_nf4_stage_checkpoint_after_a_forward_reloads_exactly(tiny_qwen3, tmp_path):
    from compressor.resume import LoopState, StageCheckpoints

    original = load_model(str(tiny_qwen3)).model.state_dict()
    loaded, _ = run_stages(tiny_qwen3, recipe_for(NF4_BODY))
    before = logits(loaded.model)  # a no-grad forward, like the held-out perplexity
    lines: list[str] = []
    checkpoints = StageCheckpoints(tmp_path / "work", {"k": 1}, ["quantize", "lowrank"], enabled=True, resume=True,
                                   echo=lines.append)
    ctx = StageContext(tokenizer=None, calibration=lambda: torch.zeros(1), device=torch.device("cpu"))
    checkpoints.save(0, loaded.model, ctx, LoopState([], [], []))
    assert lines == []  # written and verified bit for bit against compressor.load of the folder
    for name, (weight, _) in saved_nf4_weights(tmp_path / "work" / "stage-1").items():
        assert torch.equal(weight, _direct_nf4(original[name])), name
    restored, first = checkpoints.restore(loaded.model, ctx, LoopState([], [], []))
    assert first == 1 and restored is not loaded.model
    assert torch.equal(logits(restored), before)
    # The run goes on with the restored model and saves it at the end.
    save_like_the_pipeline(dataclasses.replace(loaded, model=restored), tmp_path / "out")
    for name, (weight, _) in saved_nf4_weights(tmp_path / "out").items():
        assert torch.equal(weight, _direct_nf4(original[name])), name


# -- bad input ------------------------------------------------------------------------------------


def _plan_error(folder: Path, text: str) -> str:
    recipe = parse_recipe_text(text)
    with pytest.raises(RecipeError) as err:
        plan_recipe(load_model(str(folder)).model, recipe)
    return str(err.value)


def test_smoothing_without_activation_quantization_is_a_recipe_error(tiny_llama, capsys, tmp_path):
    alone = recipe_for("- quantize: {method: smoothquant, activations: null}\n")
    message = _plan_error(tiny_llama, alone)
    assert "stages[0].quantize.activations" in message and "only smooths" in message
    # ... and the same recipe is accepted when a later stage quantizes the activations
    fixed = recipe_for(
        "- quantize: {method: smoothquant, activations: null}\n"
        "- quantize: {method: gptq, weights: {bits: 8, group_size: null}, activations: {bits: 8}}\n"
    )
    plan_recipe(load_model(str(tiny_llama)).model, parse_recipe_text(fixed))
    path = tmp_path / "bad.yaml"
    path.write_text(alone)
    assert main([str(tiny_llama), "--recipe", str(path), "--dry-run"]) == 2
    assert "only smooths" in capsys.readouterr().err


def test_nf4_followed_by_gptq_names_both_stages(tiny_qwen3):
    text = recipe_for("- quantize: {method: nf4}\n- quantize: {method: gptq, weights: {bits: 4, group_size: 64}}\n")
    message = _plan_error(tiny_qwen3, text)
    assert "stages[0] (quantize nf4)" in message and "stages[1] (quantize gptq)" in message
    assert "stages[1].quantize.method" in message


def test_fp8_on_a_torch_without_float8_is_one_clear_line(monkeypatch):
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(RecipeError) as err:
        parse_recipe_text(recipe_for("- quantize: {method: rtn, weights: {type: float, bits: 8}}\n"))
    assert "FP8 needs a torch with float8 dtypes" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(RecipeError, match="float8"):
        parse_recipe_text(recipe_for("- quantize: {method: fp8}\n"))


@pytest.mark.parametrize(
    "body, fragment",
    [
        # Keys the recipe writes are respected, so these still conflict with quantized activations.
        ("- quantize: {method: rtn, weights: {bits: 4}, activations: {bits: 8}}\n", "8-bit symmetric weights with one scale per output channel"),
        ("- quantize: {method: gptq, weights: {bits: 8, group_size: 128}, activations: {bits: 8}}\n", "one scale per output channel"),
        ("- quantize: {method: smoothquant+gptq, weights: {bits: 8, group_size: 64}}\n", "one scale per output channel"),
        ("- quantize: {method: smoothquant, weights: {bits: 8, symmetric: false}}\n", "8-bit symmetric weights"),
        ("- quantize: {method: rtn, weights: {bits: 8, group_size: null}, activations: {dynamic: false, strategy: token}}\n",
         "one calibrated scale per tensor"),
        ("- quantize: {method: rtn, weights: {bits: 8, group_size: null}, activations: {bits: 4}}\n", "must be one of 8"),
        ("- quantize: {method: rtn, weights: {bits: 8, group_size: null}, activations: {type: float}}\n",
         "needs weights of the same type"),
        ("- quantize: {method: fp8, weights: {type: float, group_size: 64}}\n", "group_size: null"),
        ("- quantize: {method: fp8, weights: {type: int, bits: 8}}\n", "weights.type must be float"),
        ("- quantize: {method: gptq, weights: {type: float}}\n", "cast, not solved"),
        ("- quantize: {method: nf4, weights: {bits: 4, group_size: 128}}\n", "remove `weights`"),
        ("- quantize: {method: rtn, double_quant: true}\n", "double_quant applies to method nf4"),
        ("- quantize: {method: rtn, smoothing_strength: 0.7}\n", "smoothing_strength applies"),
        ("- quantize: {method: smoothquant, smoothing_strength: 1.5}\n", "less than or equal to 1"),
        ("- quantize: {method: smoothquant, activations: {bits: 8, sym: true}}\n", "unknown key 'sym'"),
    ],
)
def test_bad_quantization_blocks_are_recipe_errors(body, fragment):
    with pytest.raises(RecipeError) as err:
        parse_recipe_text(recipe_for(body))
    assert fragment in str(err.value)
    assert "stages[0].quantize" in str(err.value)


@pytest.mark.parametrize(
    "body",
    [
        "- quantize: {method: smoothquant+gptq, weights: {bits: 8}, ignore: [lm_head]}\n",
        "- quantize: {method: smoothquant, weights: {observer: mse}}\n",
        "- quantize: {method: rtn, weights: {bits: 8}, activations: {bits: 8, dynamic: true}}\n",
        "- quantize: {method: gptq, activations: {bits: 8, dynamic: true}}\n",
    ],
)
def test_weight_keys_left_out_take_the_per_channel_default_of_w8a8(body):
    """`group_size` (and `bits`) left out of `weights` mean int8 per-channel when activations are
    quantized, not the generic group 128; the resolved recipe.yaml writes the effective values."""
    recipe = parse_recipe_text(recipe_for(body))
    weights = recipe.stages[0].config.weights
    assert (weights.bits, weights.group_size, weights.symmetric) == (8, None, True)
    saved = recipe.to_dict()["stages"][0]["quantize"]["weights"]
    assert saved["bits"] == 8 and saved["group_size"] is None
    assert parse_recipe_text(recipe.to_yaml()).stages[0].config == recipe.stages[0].config


def test_written_weight_keys_are_kept_beside_the_method_defaults():
    recipe = parse_recipe_text(recipe_for("- quantize: {method: smoothquant, weights: {observer: mse}}\n"))
    assert recipe.stages[0].config.weights.observer == "mse"
    fp8 = parse_recipe_text(recipe_for("- quantize: {method: fp8, weights: {observer: mse}}\n")).stages[0].config.weights
    assert (fp8.type, fp8.bits, fp8.group_size, fp8.observer) == ("float", 8, None, "mse")
    # Weight-only methods keep the generic defaults.
    plain = parse_recipe_text(recipe_for("- quantize: {method: gptq, weights: {bits: 8}}\n")).stages[0].config.weights
    assert (plain.bits, plain.group_size) == (8, 128)


def test_resolved_recipes_parse_again():
    for body in ("- quantize: {method: smoothquant}\n", "- quantize: {method: fp8}\n", "- quantize: {method: nf4}\n",
                 "- quantize: {method: smoothquant, activations: null}\n"):
        recipe = parse_recipe_text(recipe_for(body))
        again = parse_recipe_text(recipe.to_yaml())
        assert again.stages[0].config == recipe.stages[0].config


def test_builder_rebuilds_a_saved_layer_from_its_scheme(seeded):
    from compressor.formats import build_quantization_config
    from compressor.kernels.w8a8_linear import build_from_scheme

    model = nn.Sequential(nn.Linear(16, 8))
    codes = torch.randint(-128, 128, (8, 16), dtype=torch.int8)
    model[0] = W8A8Linear.from_codes(codes, torch.rand(8, 1), weight_type="int", activations=ActivationScheme("int", False),
                                     input_scale=torch.tensor([0.1]), bias=torch.randn(8), dtype=torch.float32)
    (scheme,) = build_quantization_config(model).model_dump(mode="json")["config_groups"].values()
    rebuilt = build_from_scheme(nn.Linear(16, 8), scheme, torch.float32)
    rebuilt.load_state_dict(model[0].state_dict())
    x = torch.randn(4, 16)
    assert torch.equal(rebuilt(x), model[0](x))


def test_an_nf4_checkpoint_as_input_is_distilled_and_saved_exactly(nf4_after_perplexity, tmp_path):
    # Given to `compress` again (a distill stage with the held-out perplexity before and after):
    # the NF4 layers stay frozen and are written back bit for bit; the norms train (lm_head is ignored).
    from safetensors.torch import load_file

    recipe = tmp_path / "distill.yaml"
    recipe.write_text(recipe_for("- distill: {teacher: base, steps: 3, lr: 1.0e-2}\n"))
    out = tmp_path / "out"
    assert main([str(nf4_after_perplexity), "--recipe", str(recipe), "-o", str(out), "-q"]) == 0
    before, after = load_file(str(nf4_after_perplexity / "model.safetensors")), load_file(str(out / "model.safetensors"))
    nf4_keys = {k for k in before if ".weight." in k or before[k].dtype == torch.uint8}
    assert len(nf4_keys) >= 14 * 3 and set(before) == set(after)
    for key in nf4_keys:
        assert torch.equal(after[key], before[key]), key
    trained = [k for k in before if k not in nf4_keys and not torch.equal(after[k], before[k])]
    assert len(trained) >= 5 and all(k.endswith("norm.weight") for k in trained), trained
    ((_, classes),) = reload_with_transformers(out)
    assert "Linear4bit" in classes
