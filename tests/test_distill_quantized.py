"""Distillation after quantization: LoRA on the frozen packed layers, trainable zero points,
and the `train: lora` keys at --dry-run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from compressor.algorithms import distill_losses as losses
from compressor.cli import main
from compressor.kernels.quant_linear import QuantLinear
from compressor.stages.distill import LossSpec
from compressor.training.distill_loop import LoopSettings, WeightedLoss, run_distillation
from compressor.training.trainable import select_trainable

IDS = torch.tensor([[1, 5, 9, 33, 70, 120, 7, 2, 44, 200, 17, 3]])

QUANTIZE = """name: q
calibration: {{samples: 8, seq_len: 32}}
stages:
  - quantize: {{method: rtn, weights: {{bits: 4, group_size: 32, symmetric: false}}}}
{distill}"""

LORA = """  - distill:
      loss: {kind: kl}
      train: lora
      rank: 4
      steps: 12
      lr: 1.0e-2
      batch_size: 4
      schedule: constant
"""


@pytest.fixture(scope="module")
def quantized_only(tiny_llama, tmp_path_factory):
    """The tiny model after the quantize stage alone: the reference for 'unchanged'."""
    folder = tmp_path_factory.mktemp("q")
    recipe = folder / "q.yaml"
    recipe.write_text(QUANTIZE.format(distill=""))
    assert main([str(tiny_llama), "--recipe", str(recipe), "-o", str(folder / "out"), "-q", "--no-perplexity"]) == 0
    return folder / "out"


def test_lora_distill_leaves_every_quantized_tensor_bit_identical(tiny_llama, quantized_only, tmp_path):
    from compressor.runtime import load

    recipe = tmp_path / "lora.yaml"
    recipe.write_text(QUANTIZE.format(distill=LORA))
    out = tmp_path / "lora"
    assert main([str(tiny_llama), "--recipe", str(recipe), "-o", str(out), "-q", "--no-perplexity"]) == 0

    before, after = load_file(str(quantized_only / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(before) == set(after)  # no adapter tensor leaks into the compressed-tensors file
    for suffix in ("weight_packed", "weight_scale", "weight_zero_point"):
        assert any(k.endswith(suffix) for k in before), suffix
    for key, value in before.items():
        assert torch.equal(value, after[key]), key  # packed codes, scales, zero points, norms, embeddings

    adapter = out / "lowrank_adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    factors = load_file(str(adapter / "adapter_model.safetensors"))
    assert len(factors) == 2 * 7 * 2  # A and B on the 7 quantized layers of both blocks

    curve = json.loads((out / "stage-2-distill.json").read_text())["curve"]
    first, last = [row["loss"] for row in curve[:3]], [row["loss"] for row in curve[-3:]]
    assert sum(last) < sum(first)

    with torch.no_grad():
        plain, adapted = load(quantized_only)(input_ids=IDS).logits, load(out)(input_ids=IDS).logits
    assert not torch.allclose(plain, adapted, atol=1e-4)  # the adapter loads and changes the output
    assert torch.isfinite(adapted).all()
    assert json.loads((out / "compression.json").read_text())["sizes"]["lowrank_bytes"][adapter.name] > 0


def _settings(**kw) -> LoopSettings:
    base = dict(steps=8, lr=0.3, schedule="constant", warmup_steps=0, batch_size=2, gradient_accumulation=1,
                gradient_checkpointing=False, max_grad_norm=None, weight_decay=0.0, checkpoint_every=None, log_every=1, seed=0)
    base.update(kw)
    return LoopSettings(**base)


def test_scales_mode_trains_zero_points_and_keeps_codes(tiny_llama, quantized_only):
    from transformers import AutoModelForCausalLM

    from compressor.runtime import load

    student = load(quantized_only, dtype=torch.float32, prepare_kernels=False)  # fp32: scales keep every update
    teacher = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    layers = {n: m for n, m in student.named_modules() if isinstance(m, QuantLinear)}
    packed = {n: m.weight_packed.clone() for n, m in layers.items()}
    zeros = {n: m.zero_points().clone() for n, m in layers.items()}
    scales = {n: m.weight_scale.clone() for n, m in layers.items()}

    trainable = select_trainable(student, "scales", ["lm_head"])
    assert {f"{n}.weight_zero_point" for n in layers} <= set(trainable.named)
    windows = torch.randint(3, 384, (8, 24), generator=torch.Generator().manual_seed(0))
    kl = [WeightedLoss("kl", losses.loss_registry().get("kl"), LossSpec(kind="kl"))]
    # A large lr so that zero points cross a rounding boundary within a few steps.
    run_distillation(student, teacher, windows, kl, trainable, _settings(), checkpoint_dir=None, resume=False,
                     show_progress=False, autocast_dtype=None, cpu=True)
    with torch.no_grad():
        while_training = student(input_ids=IDS).logits  # still the straight-through training forward
    trainable.finish()
    with torch.no_grad():
        restored = student(input_ids=IDS).logits
    assert torch.allclose(while_training, restored, atol=1e-4)  # what trained is what is kept (zero points rounded)

    for name, layer in layers.items():
        assert torch.equal(layer.weight_packed, packed[name]), name
        assert layer.weight_scale.dtype == scales[name].dtype and "weight_scale" in layer._buffers
        low, high = -(1 << (layer.bits - 1)), (1 << (layer.bits - 1)) - 1
        assert layer.zero_points().min() >= low and layer.zero_points().max() <= high
    assert any(not torch.equal(layers[n].zero_points(), zeros[n]) for n in layers)
    assert any(not torch.equal(layers[n].weight_scale, scales[n]) for n in layers)
    assert not any(p.requires_grad for p in student.parameters())


def test_zero_point_gradient_matches_a_direct_computation(quantized_only):
    """Straight-through rounding: at integer zero points the gradient is that of (q − z)·s."""
    from compressor.runtime import load

    layer = next(m for m in load(quantized_only, prepare_kernels=False).modules() if isinstance(m, QuantLinear))
    x = torch.randn(1, layer.in_features, generator=torch.Generator().manual_seed(1))  # one row: a kernel-sized input
    codes, zero, scale = layer.codes().float(), layer.zero_points().float(), layer.weight_scale.float()

    z, s = zero.clone().requires_grad_(True), scale.clone().requires_grad_(True)
    groups = scale.shape[1]
    weight = ((codes.reshape(layer.out_features, groups, -1) - z.unsqueeze(-1)) * s.unsqueeze(-1)).reshape_as(codes)
    (torch.nn.functional.linear(x, weight, layer.bias) ** 2).sum().backward()

    trainable = select_trainable(layer, "scales", [])
    (layer(x) ** 2).sum().backward()
    assert torch.allclose(trainable.named["weight_zero_point"].grad, z.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(trainable.named["weight_scale"].grad, s.grad, rtol=1e-4, atol=1e-6)
    trainable.finish()


@pytest.mark.parametrize(
    "block, key, fragment",
    [
        ("{rank: 4}", "stages[0].distill.rank", "applies to `train: lora`, not `train: auto`"),
        ("{train: scales, targets: [Linear]}", "stages[0].distill.targets", "applies to `train: lora`"),
        ("{train: lora, rank: 500}", "stages[0].distill.rank", "rank 500 is larger than layer"),
        ("{train: lora, targets: ['re:nothing_here']}", "stages[0].distill.targets", "matches no Linear"),
        ("{train: lora, alpha: 0}", "stages[0].distill.alpha", "greater than 0"),
        ("{train: lora, dropout: 1.0}", "stages[0].distill.dropout", "less than 1"),
    ],
)
def test_bad_lora_keys_fail_at_dry_run(block, key, fragment, tiny_llama, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\ncalibration: {samples: 4, seq_len: 32}\nstages:\n  - distill: " + block + "\n")
    code = main([str(tiny_llama), "--recipe", str(recipe), "--dry-run", "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert f"{recipe}:4 {key}:" in err and fragment in err, err


def test_lora_distillation_resumes_bit_for_bit(tiny_llama, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from compressor.training.lora_trainable import select_lora_trainable

    teacher = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    windows = torch.randint(3, 384, (8, 24), generator=torch.Generator().manual_seed(0))
    kl = [WeightedLoss("kl", losses.loss_registry().get("kl"), LossSpec(kind="kl"))]
    targets = ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"]

    def fresh():
        student = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
        with torch.no_grad():  # a gap for the adapters to close
            student.model.layers[0].mlp.up_proj.weight.mul_(0.5)
        torch.manual_seed(0)
        return student, select_lora_trainable(student, targets, rank=2, alpha=4.0, dropout=0.0)

    def run(student, trainable, folder, resume):
        return run_distillation(student, teacher, windows, kl, trainable, _settings(lr=1e-2, checkpoint_every=3),
                                checkpoint_dir=folder, resume=resume, show_progress=False, autocast_dtype=None, cpu=True)

    whole, whole_set = fresh()
    run(whole, whole_set, tmp_path / "a", False)
    reference = {name: p.detach().clone() for name, p in whole_set.named.items()}
    assert len(reference) == 4 and any("lora_B" in name and p.abs().max() > 0 for name, p in reference.items())

    crashed, crashed_set = fresh()
    original_step, calls = torch.optim.AdamW.step, {"n": 0}

    def failing_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", failing_step)
    with pytest.raises(KeyboardInterrupt):
        run(crashed, crashed_set, tmp_path / "b", False)
    monkeypatch.setattr(torch.optim.AdamW, "step", original_step)

    resumed, resumed_set = fresh()
    result = run(resumed, resumed_set, tmp_path / "b", True)
    assert result.resumed_from == 3 and result.state.step == 8
    for name, value in resumed_set.named.items():
        assert torch.equal(value, reference[name]), name
    resumed_set.finish()  # the adapters become compensation terms on their layers
    from compressor.kernels.lowrank import compensations

    assert sorted(compensations(resumed)) == sorted(targets)
    assert not any("lora" in name for name, _ in resumed.named_parameters())


@pytest.mark.parametrize(
    "stages, key",
    [
        ("  - distill: {train: scales, steps: 1}\n", "stages[0].distill.train"),
        ("  - quantize: {method: fp8}\n  - distill: {train: scales, steps: 1}\n", "stages[1].distill.train"),
        ("  - quantize: {method: rtn, weights: {bits: 4, group_size: 32}, targets: ['re:.*mlp.*']}\n"
         "  - distill: {train: scales, steps: 1, ignore: ['re:.*mlp.*']}\n", "stages[1].distill.train"),
    ],
)
@pytest.mark.parametrize("dry_run", [True, False])
def test_train_scales_with_no_quantlinear_before_it_is_refused_when_planned(stages, key, dry_run, tiny_llama, tmp_path, capsys):
    # It used to pass --dry-run and stop the run only when the distill stage started (exit 1),
    # after the stages before it had run.
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\ncalibration: {samples: 4, seq_len: 32}\nstages:\n" + stages)
    out = tmp_path / "out"
    code = main([str(tiny_llama), "--recipe", str(recipe), "-o", str(out), "-q", *(["--dry-run"] if dry_run else [])])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and f":{3 + stages.count(chr(10))} {key}:" in err, err
    assert "no earlier quantize stage makes a QuantLinear" in err and "train: lora" in err, err
    assert not out.exists() and not (tmp_path / ".out.work").exists()
