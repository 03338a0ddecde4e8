"""Triton W4A16/W8A16 kernels run on the CPU through the Triton interpreter.

Run by `tests/test_triton_interpret.py` in a fresh process with TRITON_INTERPRET=1 set before
anything imports triton (the interpreter is chosen when `triton.language` is imported, so
setting it later in a shared test process is not reliable). Run directly with:

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/triton_interpret_cases.py

Shapes are tiny and odd (K, N not powers of two; M = 1, 3, 8 (the decode kernel), 9, 16, 17) so every mask is
exercised; outputs and split-K workspaces are filled with NaN first, so an element the
kernel never writes fails the test.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.kernel_fixtures import TOLERANCE, float64_reference, random_quant_linear, relative_error

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("set TRITON_INTERPRET=1 before starting the process", allow_module_level=True)
pytest.importorskip("triton")


@pytest.fixture(scope="module")
def triton_kernels():
    from compressor.kernels import triton_wxa16

    assert triton_wxa16.INTERPRETED
    return triton_wxa16


# (bits, N, K, group, symmetric, dtype, M)
CASES = [
    (4, 40, 96, 32, True, torch.bfloat16, 1),
    (4, 19, 192, 64, False, torch.bfloat16, 3),
    (4, 33, 256, 128, False, torch.bfloat16, 8),
    (4, 21, 96, 32, False, torch.float16, 2),
    (8, 33, 128, 64, True, torch.float16, 1),
    (4, 19, 160, None, True, torch.float16, 9),
    (4, 24, 384, 128, True, torch.float16, 16),
    (4, 40, 96, 32, False, torch.float32, 17),
    (4, 21, 160, None, False, torch.bfloat16, 17),
    (4, 24, 192, 64, True, torch.float32, 1),
    (8, 40, 160, None, True, torch.bfloat16, 1),
    (8, 19, 96, 32, False, torch.float32, 3),
    (8, 24, 192, 64, True, torch.float16, 17),
    (8, 40, 384, 128, False, torch.bfloat16, 16),
]


@pytest.mark.parametrize("bits,n,k,group,symmetric,dtype,m", CASES)
def test_kernel_matches_float64_reference_and_writes_every_element(triton_kernels, bits, n, k, group, symmetric, dtype, m):
    from compressor.kernels.triton_gemv import MAX_SPLIT

    layer = random_quant_linear(n, k, bits=bits, group_size=group, symmetric=symmetric, dtype=torch.bfloat16)
    x = torch.randn(m, k).to(dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype)
    decode = m <= triton_kernels.GEMV_ROWS
    split = triton_kernels._split_k(n, k, x.device) if not decode and m <= triton_kernels.SPLIT_K_MAX_ROWS else 1
    # the decode kernel may leave workspace slices unused, but must never read one it did not write
    workspace = torch.full((MAX_SPLIT if decode else split, m, n), float("nan")) if decode or split > 1 else None
    result = triton_kernels.wxa16_matmul(
        x, layer.weight_packed, layer.weight_scale, layer.weight_zero_point, bits, group or k, out=out, workspace=workspace
    )
    assert result.data_ptr() == out.data_ptr()
    assert not torch.isnan(out).any()
    if workspace is not None and not decode:
        assert not torch.isnan(workspace).any()
    assert relative_error(out, float64_reference(layer, x)) <= TOLERANCE[dtype]


# the decode kernel with its launch fixed: direct store (one K slice), uneven and empty slices,
# with and without loading the next tile ahead
@pytest.mark.parametrize("block_n,split,prefetch,k,m", [
    (16, 1, False, 192, 1), (32, 1, True, 96, 5), (16, 3, False, 160, 2), (16, 8, True, 96, 1), (64, 4, False, 384, 8),
])
def test_decode_kernel_configs(triton_kernels, block_n, split, prefetch, k, m):
    from compressor.kernels.triton_gemv import MAX_SPLIT, wxa16_gemv

    layer = random_quant_linear(37, k, bits=4, group_size=32, symmetric=False, dtype=torch.bfloat16)
    x = torch.randn(m, k, dtype=torch.bfloat16)
    out = torch.full((m, 37), float("nan"), dtype=torch.bfloat16)
    workspace = torch.full((MAX_SPLIT, m, 37), float("nan"))
    counters = torch.zeros(3, dtype=torch.int32)
    wxa16_gemv(x, layer.weight_packed, layer.weight_scale, layer.weight_zero_point, 4, 32, out,
               workspace=workspace, counters=counters, config={"BLOCK_N": block_n, "SPLIT_K": split, "PREFETCH": prefetch})
    assert not torch.isnan(out).any()
    assert (counters == 0).all()  # the last slice of each tile resets its counter for the next call
    assert relative_error(out, float64_reference(layer, x)) <= TOLERANCE[torch.bfloat16]
    if split == 1:
        assert torch.isnan(workspace).all()  # the direct store never touches the workspace


# the tile kernels with a fixed config, reshaping the tile or one dot per code position
@pytest.mark.parametrize("bits,group,dtype,m,config", [
    (4, 64, torch.bfloat16, 12, {"BLOCK_N": 32}),
    (4, 64, torch.bfloat16, 20, {"BLOCK_M": 32, "BLOCK_N": 16}),
    (4, 128, torch.bfloat16, 12, {"BLOCK_N": 32, "PER_POSITION": True}),
    (4, 128, torch.float32, 20, {"BLOCK_M": 32, "BLOCK_N": 16, "PER_POSITION": True}),
    (8, 64, torch.float16, 16, {"BLOCK_N": 16, "PER_POSITION": True}),
    (8, 64, torch.bfloat16, 33, {"BLOCK_M": 16, "BLOCK_N": 32, "PER_POSITION": True}),
])
def test_tile_kernels_with_a_fixed_config(triton_kernels, bits, group, dtype, m, config):
    layer = random_quant_linear(37, 256, bits=bits, group_size=group, symmetric=False, dtype=torch.bfloat16)
    x = torch.randn(m, 256).to(dtype)
    out = triton_kernels.wxa16_matmul(x, layer.weight_packed, layer.weight_scale, layer.weight_zero_point, bits, group, config=config)
    assert relative_error(out, float64_reference(layer, x)) <= TOLERANCE[dtype]


def test_decode_kernel_rejects_a_config_its_counters_cannot_hold(triton_kernels):
    from compressor.kernels.triton_gemv import wxa16_gemv

    layer = random_quant_linear(16, 96, bits=4, group_size=32, symmetric=True)
    x, out = torch.randn(1, 96), torch.empty(1, 16)
    with pytest.raises(ValueError, match="BLOCK_N must be >= 16"):
        wxa16_gemv(x, layer.weight_packed, layer.weight_scale, None, 4, 32, out, config={"BLOCK_N": 8, "SPLIT_K": 2})


def test_rejects_a_group_size_that_does_not_cover_the_row(triton_kernels):
    layer = random_quant_linear(16, 96, bits=4, group_size=32, symmetric=True)
    with pytest.raises(ValueError, match="does not cover"):
        triton_kernels.wxa16_matmul(torch.randn(1, 96), layer.weight_packed, layer.weight_scale, None, 4, 64)


def test_custom_op_shapes_fake_impl_and_backward(triton_kernels):
    from compressor.kernels.triton_ops import wxa16_linear

    layer = random_quant_linear(24, 96, bits=4, group_size=32, symmetric=False, dtype=torch.float32)
    x = torch.randn(2, 3, 96, requires_grad=True)
    args = (x, layer.weight_packed, layer.weight_scale, layer.weight_zero_point, 4, 32)
    torch.library.opcheck(wxa16_linear, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    # with the layer's counters too: the schema says the op mutates nothing, which test_schema
    # checks by comparing every input before and after (the kernel resets the counters)
    one_row = (x[0, :1].detach().requires_grad_(),) + args[1:] + (torch.zeros(2, dtype=torch.int32),)
    torch.library.opcheck(wxa16_linear, one_row, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    out = wxa16_linear(*args)
    assert out.shape == (2, 3, 24)
    grads = torch.randn(2, 3, 24)
    (out * grads).sum().backward()
    expected = grads.double() @ layer.dequantized_weight(torch.float64)
    assert relative_error(x.grad, expected) <= 1e-5


def test_the_op_uses_the_counters_it_is_given_and_leaves_them_zero(triton_kernels):
    from compressor.kernels.triton_ops import wxa16_linear

    layer = random_quant_linear(40, 192, bits=4, group_size=64, symmetric=False, dtype=torch.bfloat16)
    x = torch.randn(1, 192, dtype=torch.bfloat16)
    args = (x, layer.weight_packed, layer.weight_scale, layer.weight_zero_point, 4, 64)
    counters = torch.zeros(3, dtype=torch.int32)
    assert relative_error(wxa16_linear(*args, counters), float64_reference(layer, x)) <= 1e-2
    assert (counters == 0).all()
    # a count already under way means no slice arrives last, so no output is written: proof
    # that the split-K kernel counts in the tensor it was given
    counters.fill_(100)
    out = wxa16_linear(*args, counters)
    assert relative_error(out, float64_reference(layer, x)) > 1e-2 or torch.isnan(out).any()


def test_quant_linear_backend_runs_the_op(triton_kernels):
    from compressor.kernels.triton_backend import TritonWxA16Backend

    layer = random_quant_linear(40, 160, bits=8, group_size=None, symmetric=False, dtype=torch.bfloat16, bias=True)
    backend = TritonWxA16Backend()
    x = torch.randn(3, 160, dtype=torch.bfloat16)
    assert backend.unsupported(layer, x) == "needs a CUDA device"
    state = backend.prepare(layer, x.device)
    y = backend.run(state, x) + layer.bias
    assert relative_error(y, float64_reference(layer, x)) <= 1e-2
    assert state.counters.shape == (3,) and not state.counters.any()  # one per 16 outputs, zero between calls
