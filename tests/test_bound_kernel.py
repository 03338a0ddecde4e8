"""QuantLinear's bound kernel: repeat decode calls skip dispatch, and never run a stale packed form."""

from __future__ import annotations

import pytest
import torch

from compressor.kernels.cpu_int4_avx512 import CpuAvx512W4Backend, kernel_unavailable
from tests.kernel_fixtures import TOLERANCE, float64_reference, random_quant_linear, relative_error

AVX512 = CpuAvx512W4Backend.name
# bf16 decode rows take our AVX512 kernel where the CPU has it; fp32 takes PyTorch's int4 operator
# (a backend without `bind`, so the generic bound call runs). Both must behave alike here.
KINDS = [pytest.param(torch.bfloat16, marks=pytest.mark.skipif(kernel_unavailable() is not None, reason=str(kernel_unavailable()))),
         torch.float32]
CLOSE = {torch.bfloat16: 5e-3, torch.float32: 1e-4}


def no_dispatch(*_args, **_kwargs):
    raise AssertionError("the full dispatch ran although the bound kernel applied")


@pytest.mark.parametrize("dtype", KINDS)
def test_a_repeat_call_runs_the_bound_kernel_without_dispatch(dtype, monkeypatch):
    layer = random_quant_linear(96, 128, bits=4, group_size=32, symmetric=False, dtype=dtype, bias=True)
    x = torch.randn(1, 1, 128).to(dtype)
    with torch.no_grad():
        first = layer(x)
        monkeypatch.setattr(layer, "choose_kernel", no_dispatch)
        monkeypatch.setattr(layer, "prepared_state", no_dispatch)
        again = layer(torch.randn(1, 1, 128).to(dtype))
        assert torch.equal(layer(x), first)
    assert again.shape == (1, 1, 96)
    assert relative_error(first, float64_reference(layer, x)) <= CLOSE[dtype]


@pytest.mark.parametrize("dtype", KINDS)
def test_written_or_replaced_buffers_are_never_run_stale(dtype):
    layer = random_quant_linear(64, 128, bits=4, group_size=64, symmetric=False, dtype=dtype)
    other = random_quant_linear(64, 128, bits=4, group_size=64, symmetric=False, dtype=dtype)
    third = random_quant_linear(64, 128, bits=4, group_size=64, symmetric=False, dtype=dtype)
    x = torch.randn(1, 128).to(dtype)
    with torch.no_grad():
        layer(x)
        layer.weight_scale.mul_(2)  # written in place: the version moves
        assert relative_error(layer(x), float64_reference(layer, x)) <= CLOSE[dtype]
        layer.weight_packed.copy_(other.weight_packed)
        assert relative_error(layer(x), float64_reference(layer, x)) <= CLOSE[dtype]
        layer.load_state_dict(other.state_dict(), assign=True)  # replaced: new tensor objects
        assert relative_error(layer(x), float64_reference(other, x)) <= CLOSE[dtype]
        layer._buffers["weight_zero_point"] = third.weight_zero_point.clone()  # replaced behind setattr
        assert relative_error(layer(x), float64_reference(layer, x)) <= CLOSE[dtype]
        # new storage under the same tensor objects, whose versions do not move
        version = layer.weight_packed._version
        layer.weight_packed.data = third.weight_packed.clone()
        layer.weight_scale.data = third.weight_scale.clone()
        assert layer.weight_packed._version == version
        assert relative_error(layer(x), float64_reference(layer, x)) <= CLOSE[dtype]


@pytest.mark.parametrize("dtype", KINDS)
def test_other_batch_sizes_dtypes_and_gradients_take_the_full_dispatch(dtype):
    layer = random_quant_linear(48, 64, bits=4, group_size=32, symmetric=True, dtype=dtype, bias=True)
    one, three, many = (torch.randn(rows, 64).to(dtype) for rows in (1, 3, 40))
    with torch.no_grad():
        decode_kernel = (layer(one), layer.kernel_report["kernel"])[1]
        assert relative_error(layer(three), float64_reference(layer, three)) <= CLOSE[dtype]
        assert relative_error(layer(many), float64_reference(layer, many)) <= CLOSE[dtype]
        assert layer.kernel_report["kernel"] == "reference"  # prefill-sized: dequantize + dense matmul
        layer(one)
        assert layer.kernel_report["kernel"] == decode_kernel
    x = one.clone().requires_grad_(True)
    layer(x).sum().backward()  # gradients flow through the dequantized weight, not the bound call
    expected = layer.dequantized_weight(torch.float64).sum(0)
    assert relative_error(x.grad, expected.unsqueeze(0)) <= TOLERANCE[dtype]


def test_moving_or_casting_the_layer_drops_the_bound_kernel():
    layer = random_quant_linear(32, 64, bits=4, group_size=32, symmetric=True, dtype=torch.float32)
    with torch.no_grad():
        layer(torch.randn(1, 64))
        assert layer._bound is not None
        layer.to(torch.bfloat16)
        assert layer._bound is None
        x = torch.randn(1, 64).to(torch.bfloat16)
        assert relative_error(layer(x), float64_reference(layer, x)) <= CLOSE[torch.bfloat16]


@pytest.mark.parametrize("dtype", KINDS)
def test_a_layer_that_has_run_pickles_and_binds_again(dtype):
    import io

    layer = random_quant_linear(32, 64, bits=4, group_size=32, symmetric=False, dtype=dtype)
    x = torch.randn(1, 64).to(dtype)
    with torch.no_grad():
        expected = layer(x)
        buffer = io.BytesIO()
        torch.save(layer, buffer)  # the bound call closes over native pointers: it must not be pickled
        buffer.seek(0)
        restored = torch.load(buffer, weights_only=False)
        assert restored._bound is None and torch.equal(restored(x), expected)
