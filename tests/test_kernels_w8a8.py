"""W8A8Linear fast paths (int8 through torch._int_mm, FP8 through torch._scaled_mm) against the
reference computation, their dispatch, backward, the custom op under torch.compile, and
`compressor.load` of W8A8 / FP8 checkpoints running the fast paths.

The default registry leaves FP8 layers on CPU to the reference path (PyTorch's CPU _scaled_mm
is slower than it); tests of the FP8 fast path ask for it on CPU with the `fp8_on_cpu` fixture.

Tolerances: every comparison is against float64 math on the same codes. The int8 product is
exact in int32; the fp32 output then carries only fp32 rounding of the scales (≤ 1e-5 of the
largest output). FP8 products on CPU are summed in fp32 (≤ 1e-5 as well). bf16 outputs are
rounded once to bf16 (relative error ≤ 1e-2, the project's bound for bf16 kernels).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from compressor.cli import main
from compressor.kernels.dispatch import REFERENCE, KernelRegistry, w8a8_linear_kernels
from compressor.kernels.w8a8_backends import CPU_SCALED_MM_SLOWER, Fp8ScaledMmBackend, Int8IntMmBackend
from compressor.kernels.w8a8_linear import ActivationScheme, W8A8Linear
from compressor.kernels.w8a8_ops import w8a8_linear

FAST = {"int": "int8-int-mm", "float": "fp8-scaled-mm"}
SHAPES = [(1, 37, 19), (3, 64, 33), (17, 130, 45)]  # rows, in, out: odd and not powers of two


@pytest.fixture
def fp8_on_cpu(monkeypatch):
    """The W8A8 registry with the FP8 backend allowed on CPU."""
    registry = KernelRegistry([Int8IntMmBackend(), Fp8ScaledMmBackend(on_cpu=True)])
    monkeypatch.setattr(W8A8Linear, "kernel_registry", lambda self: registry)
    return registry


def random_layer(out_features: int, in_features: int, kind: str, dynamic: bool | None, *, dtype=torch.float32,
                 bias: bool = True, generator: torch.Generator | None = None) -> W8A8Linear:
    """Fresh codes over the whole 8-bit grid; `dynamic=None` makes a weight-only layer."""
    if kind == "int":
        codes = torch.randint(-128, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
    else:
        codes = (torch.randn(out_features, in_features, generator=generator) * 150).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.rand(out_features, 1, generator=generator) * 0.01 + 1e-3
    activations = None if dynamic is None else ActivationScheme(kind, dynamic)
    return W8A8Linear.from_codes(
        codes, scale, weight_type=kind, activations=activations,
        input_scale=None if dynamic in (None, True) else torch.tensor([0.03]),
        bias=torch.randn(out_features, generator=generator) if bias else None, dtype=dtype,
    )


def float64_expected(layer: W8A8Linear, x: torch.Tensor) -> torch.Tensor:
    """The layer's own input codes and scales, multiplied in float64."""
    codes, x_scale = layer.quantize_input(x)
    weight = layer.weight.double() * layer.weight_scale.double()
    out = (codes.double() * x_scale.double()) @ weight.t()
    return out + layer.bias.double() if layer.bias is not None else out


def inputs(rows: int, in_features: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    # Uneven channels like real activations, and one all-zero token when there are several.
    x = torch.randn(rows, in_features, generator=generator) * torch.linspace(0.1, 6.0, in_features)
    if rows > 1:
        x[1] = 0.0
    return x.to(dtype)


@pytest.mark.parametrize("kind", ["int", "float"])
@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("rows, in_features, out_features", SHAPES)
def test_fast_path_matches_float64_reference_fp32(kind, dynamic, rows, in_features, out_features, fp8_on_cpu):
    gen = torch.Generator().manual_seed(rows * 1000 + in_features)
    layer = random_layer(out_features, in_features, kind, dynamic, generator=gen)
    x = inputs(rows, in_features, torch.float32, gen)
    out = layer(x)
    assert layer.kernel_report["kernel"] == FAST[kind]
    expected = float64_expected(layer, x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out.double() - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    reference = layer.reference_forward(x)
    assert (reference.double() - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    if rows > 1:  # the all-zero token gives exactly the bias
        assert torch.equal(out[1], layer.bias)


@pytest.mark.parametrize("kind", ["int", "float"])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_fast_path_bf16_activations_and_3d_input(kind, rows, fp8_on_cpu):
    gen = torch.Generator().manual_seed(7 + rows)
    layer = random_layer(29, 72, kind, True, dtype=torch.bfloat16, generator=gen)
    x = inputs(rows * 2, 72, torch.bfloat16, gen).reshape(2, rows, 72)
    out = layer(x)
    assert layer.kernel_report["kernel"] == FAST[kind]
    assert out.shape == (2, rows, 29) and out.dtype == torch.bfloat16
    expected = float64_expected(layer, x.reshape(-1, 72)).reshape(2, rows, 29)
    assert ((out.double() - expected).norm() / expected.norm()).item() <= 1e-2
    reference = layer.reference_forward(x)
    assert ((out.double() - reference.double()).norm() / expected.norm()).item() <= 1e-2


def test_prepared_form_follows_written_replaced_and_reassigned_buffers():
    gen = torch.Generator().manual_seed(7)
    layer, other, third = (random_layer(24, 64, "int", True, generator=gen) for _ in range(3))
    x = inputs(3, 64, torch.float32, gen)

    def matches_own_buffers() -> bool:
        out, expected = layer(x), float64_expected(layer, x)
        return (out.double() - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()

    assert matches_own_buffers() and layer.kernel_report["kernel"] == "int8-int-mm"
    layer.weight.copy_(other.weight)  # written in place: the version moves
    assert matches_own_buffers()
    layer.weight_scale.data = other.weight_scale.clone()  # new storage: same object and version
    assert matches_own_buffers()
    layer._buffers["weight"] = third.weight.clone()  # replaced
    assert matches_own_buffers()


def test_static_scale_saturates_and_fp8_codes_are_cast(seeded, fp8_on_cpu):
    layer = random_layer(8, 16, "float", False, bias=False)
    x = torch.randn(3, 16)
    x[0, 0] = 1e4  # far beyond 448 · 0.03: saturates at the top of the e4m3 grid
    out = layer(x)
    assert layer.kernel_report["kernel"] == "fp8-scaled-mm"
    x_codes = (x / 0.03).clamp(-448, 448).to(torch.float8_e4m3fn).double()
    assert x_codes[0, 0] == 448
    expected = (x_codes * 0.03) @ (layer.weight.double() * layer.weight_scale.double()).t()
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_dispatch_picks_int8_on_cpu_leaves_fp8_to_the_reference_and_says_why():
    assert w8a8_linear_kernels().names == ["int8-int-mm", "fp8-scaled-mm"]
    int_layer, fp8_layer = random_layer(16, 32, "int", True), random_layer(16, 32, "float", True)
    x = torch.randn(2, 32)
    assert int_layer.prepare_kernels(x) == "int8-int-mm"
    choice = fp8_layer.choose_kernel(x)
    assert choice.name == REFERENCE
    assert choice.skipped == {
        "int8-int-mm": "multiplies int8 × int8 codes; layer is FP8 weights × FP8 activations",
        "fp8-scaled-mm": CPU_SCALED_MM_SLOWER,
    }
    assert Fp8ScaledMmBackend(on_cpu=True).unsupported(fp8_layer, x) is None

    weight_only = random_layer(16, 32, "float", None)
    weight_only(x)
    assert weight_only.kernel_report["kernel"] == REFERENCE
    assert set(weight_only.kernel_report["skipped"].values()) == {"weight-only layer: no activation codes to multiply"}

    int_layer(x.double())  # no float64 operator: reference path, with the reason
    assert int_layer.kernel_report["kernel"] == REFERENCE
    assert "not torch.float64" in int_layer.kernel_report["skipped"]["int8-int-mm"]


def _cuda_input(rows: int, in_features: int) -> SimpleNamespace:
    """What the backends read of an input (device, dtype, size), as if it lived on a GPU."""
    return SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16, numel=lambda: rows * in_features)


def test_cuda_rules_of_the_operators(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    fp8 = random_layer(32, 48, "float", True)
    assert "compute capability >= 8.9" in Fp8ScaledMmBackend().unsupported(fp8, _cuda_input(4, 48))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert Fp8ScaledMmBackend().unsupported(fp8, _cuda_input(4, 48)) is None
    odd = random_layer(30, 48, "float", True)
    assert "multiples of 16" in Fp8ScaledMmBackend().unsupported(odd, _cuda_input(4, 48))

    int8 = random_layer(32, 48, "int", True)
    assert "more than 16 rows" in Int8IntMmBackend().unsupported(int8, _cuda_input(16, 48))
    assert Int8IntMmBackend().unsupported(int8, _cuda_input(17, 48)) is None
    assert "multiples of 8" in Int8IntMmBackend().unsupported(random_layer(32, 44, "int", True), _cuda_input(17, 44))


@pytest.mark.parametrize("kind", ["int", "float"])
@pytest.mark.parametrize("dynamic", [True, False])
def test_backward_matches_the_reference_path(kind, dynamic, fp8_on_cpu):
    gen = torch.Generator().manual_seed(3)
    layer = random_layer(21, 35, kind, dynamic, generator=gen)
    x = inputs(6, 35, torch.float32, gen).reshape(2, 3, 35).requires_grad_()
    grad = torch.randn(2, 3, 21, generator=gen)
    (fast,) = torch.autograd.grad(layer(x), x, grad)
    assert layer.kernel_report["kernel"] == FAST[kind]
    (reference,) = torch.autograd.grad(layer.reference_forward(x), x, grad)
    # straight-through activation quantization: the gradient of x @ Wᵀ with the dequantized weight
    expected = grad.double() @ (layer.weight.double() * layer.weight_scale.double())
    assert torch.allclose(fast.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(reference.double(), expected, rtol=1e-5, atol=1e-6)
    assert not layer.weight.requires_grad and layer.bias.grad is None


@pytest.mark.parametrize("kind", ["int", "float"])
def test_custom_op_registration_and_torch_compile(kind, fp8_on_cpu):
    gen = torch.Generator().manual_seed(11)
    layer = random_layer(24, 40, kind, True, generator=gen)
    state = layer.prepared_state(fp8_on_cpu.choose(layer, torch.randn(1, 40)).backend, torch.device("cpu"))
    x = torch.randn(5, 40, generator=gen, requires_grad=True)
    # opcheck's schema check compares the inputs before and after with arithmetic that float8
    # tensors lack on CPU; the FP8 op gets the other two checks.
    utils = ("test_faketensor", "test_autograd_registration") + (("test_schema",) if kind == "int" else ())
    torch.library.opcheck(w8a8_linear, (x, state.weight_t, state.weight_scale, None, layer.bias), test_utils=utils)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x.detach()), layer(x.detach()), rtol=0, atol=0)


# -- compressor.load of real checkpoints made by the pipeline ------------------------------------

HEAD = "name: t\ncalibration: {samples: 8, seq_len: 32}\nstages:\n"
RECIPES = {
    "w8a8": HEAD + "  - quantize: {method: rtn, weights: {bits: 8, group_size: null}, activations: {bits: 8, dynamic: true}}\n",
    "w8a8-static": HEAD + "  - quantize: {method: rtn, weights: {bits: 8, group_size: null}, activations: {bits: 8, dynamic: false}}\n",
    "fp8-dynamic": HEAD + "  - quantize: {method: fp8}\n",
}
IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 13, 64, 3, 120], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]])


@pytest.mark.parametrize("name, kernel", [("w8a8", "int8-int-mm"), ("w8a8-static", "int8-int-mm"), ("fp8-dynamic", "fp8-scaled-mm")])
def test_load_runs_the_fast_paths_with_the_reference_logits(name, kernel, tiny_llama, tmp_path: Path, fp8_on_cpu):
    from compressor.runtime import kernel_summary, load

    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(RECIPES[name])
    out = tmp_path / name
    assert main([str(tiny_llama), "--recipe", str(recipe), "-o", str(out), "-q", "--no-perplexity"]) == 0
    model = load(out, dtype=torch.float32)
    layers = [m for m in model.modules() if isinstance(m, W8A8Linear)]
    assert len(layers) == 14
    with torch.no_grad():
        fast = model(IDS).logits
    assert {report["kernel"] for report in kernel_summary(model).values()} == {kernel}
    for layer in layers:  # the same model on the reference path
        layer.forward = layer.reference_forward
    with torch.no_grad():
        reference = model(IDS).logits
    assert not any(isinstance(m, nn.Linear) and "layers." in n for n, m in model.named_modules())
    # fp32 throughout; each layer agrees to ~1e-7, but that rounding can move a later layer's input
    # across a quantization boundary: one code step (1/127 of a token's range) in one channel.
    # Measured: max 1.2e-3, so 1e-2 of the logit range bounds a real mismatch, not that rounding.
    difference = (fast - reference).abs()
    assert difference.max().item() <= 1e-2 * reference.abs().max().item()
    assert difference.mean().item() <= 1e-3 * reference.abs().max().item()
