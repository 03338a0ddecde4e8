"""QuantLinear's CPU fast paths (PyTorch's packed int4/int8 operators) against the reference.

Our own AVX512-BF16 kernel would take the bf16 decode cases here; it is switched off in this file
so these keep testing PyTorch's operators (tests/test_kernels_avx512.py tests ours)."""

from __future__ import annotations

import pytest
import torch

from compressor.kernels.dispatch import REFERENCE
from compressor.kernels.native_build import SWITCH
from tests.kernel_fixtures import TOLERANCE, float64_reference, random_quant_linear, relative_error



@pytest.fixture(autouse=True)
def _pytorch_operators_only(monkeypatch):
    monkeypatch.setenv(SWITCH, "0")


# (bits, out, in, group, symmetric, kernel expected): odd row counts (padded to 16 inside),
# per-channel int4 through repeated scales, grouped int8 and int4 g16 falling back.
CASES = [
    (4, 40, 96, 32, True, "cpu-int4pack"),
    (4, 24, 192, 64, False, "cpu-int4pack"),
    (4, 17, 256, 128, True, "cpu-int4pack"),
    (4, 33, 160, None, False, "cpu-int4pack"),
    (8, 40, 96, None, True, "cpu-int8pack"),
    (8, 19, 160, None, False, "cpu-int8pack"),
    (8, 24, 96, 32, True, REFERENCE),
    (4, 24, 96, 16, True, REFERENCE),
]


@pytest.mark.parametrize("bits,n,k,group,symmetric,kernel", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_cpu_kernel_matches_float64_reference(bits, n, k, group, symmetric, kernel, dtype, rows):
    layer = random_quant_linear(n, k, bits=bits, group_size=group, symmetric=symmetric, dtype=dtype, bias=True)
    x = torch.randn(rows, k).to(dtype)
    with torch.no_grad():
        fast = layer(x)
        reference = layer.reference_forward(x)
    expected_kernel = kernel if rows <= 16 else REFERENCE  # prefill-sized inputs take the dense path
    assert layer.kernel_report["kernel"] == expected_kernel
    assert fast.dtype == dtype and fast.shape == (rows, n)
    expected = float64_reference(layer, x)
    assert relative_error(fast, expected) <= TOLERANCE[dtype]
    assert relative_error(reference, expected) <= TOLERANCE[dtype]


def test_fallback_reasons_are_recorded():
    layer = random_quant_linear(24, 96, bits=4, group_size=16, symmetric=True)
    layer(torch.randn(1, 96, dtype=torch.bfloat16))
    skipped = layer.kernel_report["skipped"]
    assert layer.kernel_report["kernel"] == REFERENCE
    assert "group size 32/64/128/256" in skipped["cpu-int4pack"]
    assert skipped["triton-wxa16"] == "needs a CUDA device"
    assert "int8 operator" in skipped["cpu-int8pack"]


@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, False), (8, None, True)])
def test_backward_through_fast_path_matches_reference(bits, group, symmetric):
    layer = random_quant_linear(32, 96, bits=bits, group_size=group, symmetric=symmetric, dtype=torch.float32, bias=True)
    x = torch.randn(2, 3, 96, requires_grad=True)
    weights = torch.randn(2, 3, 32)
    (layer(x) * weights).sum().backward()
    assert layer.kernel_report["kernel"] != REFERENCE
    x_ref = x.detach().clone().requires_grad_(True)
    (layer.reference_forward(x_ref) * weights).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    assert all(not t.requires_grad for t in layer.buffers())


def test_gradcheck_in_float64_on_reference_path():
    layer = random_quant_linear(8, 32, bits=4, group_size=32, symmetric=True, dtype=torch.float64)
    x = torch.randn(2, 32, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_packed_form_is_rebuilt_when_buffers_change():
    layer = random_quant_linear(32, 64, bits=4, group_size=32, symmetric=True, dtype=torch.float32)
    other = random_quant_linear(32, 64, bits=4, group_size=32, symmetric=True, dtype=torch.float32)
    x = torch.randn(1, 64)
    with torch.no_grad():
        layer(x)
        layer.load_state_dict(other.state_dict())
        after = layer(x)
    assert relative_error(after, float64_reference(other, x)) <= 1e-4


def test_triton_backend_refuses_groups_its_k_tile_cannot_cover():
    """The Triton kernel's K tile divides the group size and is at least 16 (tl.dot's smallest)."""
    import importlib.util
    from types import SimpleNamespace

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    from compressor.kernels.triton_backend import TritonWxA16Backend
    from compressor.kernels.triton_parts import block_k

    cuda_input = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16)
    backend = TritonWxA16Backend()
    narrow = random_quant_linear(16, 64, bits=4, group_size=8, symmetric=True)
    assert backend.unsupported(narrow, cuda_input) == "kernel needs the group size (or input width) a multiple of 16; layer has 8"
    assert backend.unsupported(random_quant_linear(16, 64, bits=4, group_size=32, symmetric=True), cuda_input) is None
    assert [block_k(g) for g in (16, 32, 48, 64, 128, 160, 4096)] == [16, 32, 16, 64, 128, 32, 128]
