"""The fused W4 gated MLP (one native call at decode) against the float64 formula and its fallbacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compressor.kernels.cpu_int4_avx512 import kernel_unavailable
from compressor.kernels.gated_mlp import FusedGatedMlpForward, install_fused_mlps, remove_fused_mlps
from tests.kernel_fixtures import TOLERANCE, random_quant_linear, relative_error

pytestmark = pytest.mark.skipif(kernel_unavailable() is not None, reason=str(kernel_unavailable()))
CPU = torch.device("cpu")


def quantized_mlp(hidden: int = 96, intermediate: int = 128, *, symmetric: bool = True, act: str = "silu"):
    """transformers' LlamaMLP with random W4 layers (group 32)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, hidden_act=act)
    mlp = LlamaMLP(config).to(torch.bfloat16)
    generator = torch.Generator().manual_seed(hidden + intermediate)
    for name, (out_features, in_features) in {"gate_proj": (intermediate, hidden), "up_proj": (intermediate, hidden),
                                              "down_proj": (hidden, intermediate)}.items():
        layer = random_quant_linear(out_features, in_features, bits=4, group_size=32, symmetric=symmetric,
                                    dtype=torch.bfloat16, generator=generator)
        setattr(mlp, name, layer)
    return mlp.eval()


def float64_mlp(mlp, x: torch.Tensor) -> torch.Tensor:
    gate, up, down = (getattr(mlp, n).dequantized_weight(torch.float64) for n in ("gate_proj", "up_proj", "down_proj"))
    x = x.double()
    return (F.silu(x @ gate.t()) * (x @ up.t())) @ down.t()


def installed(mlp) -> bool:
    return isinstance(mlp.__dict__.get("forward"), FusedGatedMlpForward)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_fused_call_matches_the_float64_formula(symmetric, rows):
    mlp = quantized_mlp(symmetric=symmetric)
    assert install_fused_mlps(mlp, CPU, torch.bfloat16) == [""] and installed(mlp)
    x = torch.randn(2, rows, 96).to(torch.bfloat16)[1:]  # an offset view
    with torch.no_grad():
        out = mlp(x)
    assert mlp.forward.bound is not None  # the fused call ran, not the plain forward
    assert all(getattr(mlp, n).kernel_report["fused"] == "gated MLP call" for n in ("gate_proj", "up_proj", "down_proj"))
    assert out.shape == (1, rows, 96) and out.dtype == torch.bfloat16
    assert relative_error(out, float64_mlp(mlp, x)) <= TOLERANCE[torch.bfloat16]


def test_other_inputs_and_changed_weights_take_the_plain_forward_or_rebind():
    mlp = quantized_mlp()
    install_fused_mlps(mlp, CPU, torch.bfloat16)
    plain = type(mlp).forward.__get__(mlp)
    with torch.no_grad():
        many = torch.randn(1, 17, 96).to(torch.bfloat16)  # above the decode kernel's 16 rows
        assert torch.equal(mlp(many), plain(many))
        one = torch.randn(1, 1, 96).to(torch.bfloat16)
        mlp(one)
        mlp.down_proj.weight_scale.mul_(3)  # written in place: the bound call must not run stale
        assert relative_error(mlp(one), float64_mlp(mlp, one)) <= TOLERANCE[torch.bfloat16]
    x = one.clone().requires_grad_(True)
    mlp(x).sum().backward()  # the plain forward: gradients flow through the layers' own backward
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_a_compensation_attached_after_fusing_is_not_skipped():
    """`apply_adapter(compressor.load(OUT), ADAPTER)`: the adapter's forward hooks on gate/up/down
    come after the fused call was installed, and must still apply."""
    from compressor.kernels.lowrank import attach_compensation

    mlp = quantized_mlp()
    install_fused_mlps(mlp, CPU, torch.bfloat16)
    one = torch.randn(1, 1, 96).to(torch.bfloat16)
    with torch.no_grad():
        mlp(one)  # bound before the adapter exists
        generator = torch.Generator().manual_seed(1)
        a = torch.randn(4, 96, generator=generator).to(torch.bfloat16)
        b = torch.randn(128, 4, generator=generator).to(torch.bfloat16)
        attach_compensation(mlp.up_proj, a, b, "adapter")
        gate, up, down = (getattr(mlp, n).dequantized_weight(torch.float64) for n in ("gate_proj", "up_proj", "down_proj"))
        x = one.double()
        expected = (F.silu(x @ gate.t()) * (x @ up.t() + x @ a.double().t() @ b.double().t())) @ down.t()
        assert relative_error(mlp(one), expected) <= TOLERANCE[torch.bfloat16]


def test_only_gated_silu_mlps_with_64_wide_tiles_are_fused():
    assert install_fused_mlps(quantized_mlp(act="gelu"), CPU, torch.bfloat16) == []  # the check sees another function
    assert install_fused_mlps(quantized_mlp(intermediate=96), CPU, torch.bfloat16) == []  # 96 is not a multiple of 64
    assert install_fused_mlps(quantized_mlp(), CPU, torch.float32) == []  # fp32 models keep the int4 operator
    twice = quantized_mlp()
    assert install_fused_mlps(twice, CPU, torch.bfloat16) == [""] and install_fused_mlps(twice, CPU, torch.bfloat16) == []


def test_removing_gives_the_module_its_own_forward_back():
    mlp = quantized_mlp()
    install_fused_mlps(mlp, CPU, torch.bfloat16)
    remove_fused_mlps(mlp)
    assert "forward" not in mlp.__dict__ and not installed(mlp)


def test_compressor_load_fuses_the_mlps_and_the_dense_twin_does_not(tiny_qwen2, tmp_path):
    import compressor
    from compressor.cli import main
    from compressor.decode_speed import densified

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: w4\ndescription: t\ncalibration: {samples: 2, seq_len: 16}\nstages:\n"
                      "  - quantize: {method: rtn, weights: {bits: 4, group_size: 32}, ignore: [lm_head]}\n")
    assert main([str(tiny_qwen2), "--recipe", str(recipe), "-o", str(tmp_path / "out"), "-q", "--no-perplexity"]) == 0
    model = compressor.load(tmp_path / "out", dtype=torch.bfloat16)
    mlps = [m for name, m in model.named_modules() if name.endswith(".mlp")]
    assert len(mlps) == 2 and all(installed(m) for m in mlps)
    twin = densified(model)
    assert not any(installed(m) for name, m in twin.named_modules() if name.endswith(".mlp"))
    ids = torch.tensor([[3, 7, 11]])
    with torch.no_grad():
        fused_logits = model(ids[:, :1]).logits
        remove_fused_mlps(model)
        plain_logits = model(ids[:, :1]).logits
    assert relative_error(fused_logits, plain_logits.double()) <= TOLERANCE[torch.bfloat16]


def test_an_mlp_that_has_run_pickles_with_its_fused_call():
    import io

    mlp = quantized_mlp()
    install_fused_mlps(mlp, CPU, torch.bfloat16)
    x = torch.randn(1, 1, 96).to(torch.bfloat16)
    with torch.no_grad():
        expected = mlp(x)
        buffer = io.BytesIO()
        torch.save(mlp, buffer)
        buffer.seek(0)
        restored = torch.load(buffer, weights_only=False)
        assert installed(restored) and restored.forward.mlp is restored
        assert torch.equal(restored(x), expected) and restored.forward.bound is not None
