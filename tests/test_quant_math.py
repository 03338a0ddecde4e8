"""RTN, GPTQ and packing against direct reference computations."""

from __future__ import annotations

import pytest
import torch

from compressor.algorithms.gptq import HessianAccumulator, gptq_quantize
from compressor.algorithms.grid import WeightGrid, effective_group_size
from compressor.algorithms.rtn import rtn_quantize
from compressor.kernels.packing import pack_codes, unpack_codes
from compressor.kernels.quant_linear import QuantLinear


def reference_dequant(codes, scale, zero, group):
    """Element by element: w[r, c] = (q[r, c] - z[r, g]) * s[r, g] with g = c // group."""
    out = torch.empty(codes.shape, dtype=torch.float64)
    for c in range(codes.shape[1]):
        g = c // group
        z = zero[:, g].double() if zero is not None else 0.0
        out[:, c] = (codes[:, c].double() - z) * scale[:, g].double()
    return out


@pytest.mark.parametrize("in_features, asked, expected", [(576, 128, 64), (1536, 128, 128), (96, 64, 32), (100, 64, None), (576, None, None), (576, 96, 96),
                                                            # a group spanning the row or more: one scale per row
                                                            (96, 128, None), (64, 128, None), (128, 128, 128)])
def test_effective_group_size(in_features, asked, expected):
    assert effective_group_size(in_features, asked) == expected


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_matches_reference(bits, symmetric, seeded):
    weight = torch.randn(24, 96) * 0.05
    grid = WeightGrid(bits, symmetric, 32, scale_dtype=torch.float32)
    codes, scale, zero = rtn_quantize(weight, grid)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert codes.min() >= qmin and codes.max() <= qmax
    for r in range(weight.shape[0]):
        for g in range(3):
            block = weight[r, g * 32 : (g + 1) * 32].double()
            lo, hi = min(block.min().item(), 0.0), max(block.max().item(), 0.0)
            if symmetric:
                s = max(abs(lo), hi) / ((qmax - qmin) / 2)
                assert scale[r, g].item() == pytest.approx(s, rel=1e-6)
                expect = torch.clamp(torch.round(block.float() / scale[r, g]), qmin, qmax).double()
            else:
                s = (hi - lo) / (qmax - qmin)
                assert scale[r, g].item() == pytest.approx(s, rel=1e-6)
                z = min(max(round(qmin - lo / scale[r, g].item()), qmin), qmax)
                assert zero[r, g].item() == z
                expect = torch.clamp(torch.round(block.float() / scale[r, g]) + z, qmin, qmax).double()
            assert torch.equal(codes[r, g * 32 : (g + 1) * 32].double(), expect)
    error = (reference_dequant(codes, scale, zero, 32) - weight.double()).abs()
    step = scale.double().repeat_interleave(32, dim=1)
    assert (error <= step * (0.5 if bits > 2 or symmetric else 1.0) + 1e-6).float().mean() > 0.95


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(7, 96), (5, 100), (1, 33), (3, 576)])
def test_pack_unpack_round_trip(bits, shape, seeded):
    codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), shape, dtype=torch.int8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (shape[0], -(-shape[1] * bits // 32))
    assert torch.equal(unpack_codes(packed, bits, shape), codes)
    packed0 = pack_codes(codes, bits, dim=0)
    assert torch.equal(unpack_codes(packed0, bits, shape, dim=0), codes)


@pytest.mark.parametrize("symmetric", [True, False])
def test_quant_linear_dequantizes_exactly(symmetric, seeded):
    weight = torch.randn(40, 96) * 0.1
    grid = WeightGrid(4, symmetric, 32, scale_dtype=torch.bfloat16)
    codes, scale, zero = rtn_quantize(weight, grid)
    bias = torch.randn(40)
    module = QuantLinear.from_codes(codes, scale, zero.to(torch.int8) if zero is not None else None, bits=4, group_size=32, bias=bias, dtype=torch.float32)
    expected = reference_dequant(codes, scale, zero, 32)
    assert torch.allclose(module.dequantized_weight(torch.float64), expected, atol=1e-7)
    x = torch.randn(3, 5, 96, requires_grad=True)
    y = module(x)
    assert torch.allclose(y.double(), x.double() @ expected.t() + bias.double(), atol=1e-4)
    y.sum().backward()  # differentiable with respect to the input
    assert torch.allclose(x.grad[0, 0].double(), expected.sum(dim=0), atol=1e-4)


def reference_gptq(weight, hessian, grid, dampening):
    """The paper's algorithm, one column at a time, no blocking, no act order."""
    w = weight.float().clone()
    h = hessian.float().clone()
    n = h.shape[0]
    h += torch.eye(n) * dampening * torch.diag(h).mean()
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros_like(w)
    group = grid.group_size or n
    scale = zero = None
    scales, zeros = [], []  # zeros stay None entries for symmetric grids
    for c in range(n):
        if c % group == 0:
            block = w[:, c : c + group].float()
            s, z = rtn_quantize(block, WeightGrid(grid.bits, grid.symmetric, None, grid.scale_dtype))[1:]
            scale, zero = s[:, 0], (z[:, 0] if z is not None else None)
            scales.append(scale)
            zeros.append(zero)
        q = torch.round(w[:, c] / scale) + (zero if zero is not None else 0)
        q = torch.clamp(q, grid.qmin, grid.qmax)
        codes[:, c] = q
        dq = (q - (zero if zero is not None else 0)) * scale
        err = (w[:, c] - dq) / hinv[c, c]
        w[:, c:] -= err.unsqueeze(1) * hinv[c, c:].unsqueeze(0)
    zero_table = torch.stack(zeros, 1) if zeros[0] is not None else None
    return codes.double(), torch.stack(scales, 1).double(), zero_table


def random_hessian(n, samples=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, n, generator=g) * torch.linspace(0.2, 3.0, n)  # uneven column energy
    acc = HessianAccumulator(n)
    for chunk in x.split(64):
        acc.add(chunk)
    return acc.hessian, x


def test_hessian_accumulator_equals_direct_formula():
    hessian, x = random_hessian(48)
    assert torch.allclose(hessian, 2 * x.t() @ x / x.shape[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_matches_reference_algorithm(symmetric, seeded):
    weight = torch.randn(16, 96) * 0.05
    hessian, _ = random_hessian(96)
    grid = WeightGrid(4, symmetric, 32, scale_dtype=torch.float32)
    result = gptq_quantize(weight, hessian, grid, block_size=40, dampening=0.01, act_order=False)
    codes, scales, zeros = reference_gptq(weight, hessian, grid, 0.01)
    # Blocking only reorders float sums: a rare code may flip at a rounding tie.
    assert (result.codes.double() == codes).float().mean() > 0.995
    assert torch.allclose(result.scale.double(), scales, rtol=1e-3)
    ours = weighted_error(weight, reference_dequant(result.codes, result.scale, result.zero, 32), hessian)
    theirs = weighted_error(weight, reference_dequant(codes, scales, zeros, 32), hessian)
    assert ours == pytest.approx(theirs, rel=0.01)


def weighted_error(weight, dequant, hessian):
    delta = (weight.double() - dequant.double())
    return torch.trace(delta @ hessian.double() @ delta.t()).item()


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_beats_rtn_on_the_layer_objective(act_order, seeded):
    weight = torch.randn(32, 128) * 0.05
    hessian, _ = random_hessian(128, samples=512)
    grid = WeightGrid(4, True, 64, scale_dtype=torch.float32)
    rtn_codes, rtn_scale, _ = rtn_quantize(weight, grid)
    result = gptq_quantize(weight, hessian, grid, act_order=act_order)
    gptq_err = weighted_error(weight, reference_dequant(result.codes, result.scale, None, 64), hessian)
    rtn_err = weighted_error(weight, reference_dequant(rtn_codes, rtn_scale, None, 64), hessian)
    assert gptq_err < 0.93 * rtn_err


def test_gptq_with_identity_hessian_is_rtn(seeded):
    weight = torch.randn(8, 64)
    grid = WeightGrid(4, True, 32, scale_dtype=torch.float32)
    result = gptq_quantize(weight, torch.eye(64), grid, act_order=True, dampening=0.01)
    assert torch.equal(result.codes, rtn_quantize(weight, grid)[0])


def test_gptq_dead_columns_give_no_nan(seeded):
    weight = torch.randn(8, 64)
    hessian, _ = random_hessian(64)
    hessian[:, 5] = 0
    hessian[5, :] = 0
    result = gptq_quantize(weight, hessian, WeightGrid(4, True, 32, scale_dtype=torch.float32))
    assert result.fallback is None
    assert torch.isfinite(result.scale).all()
    assert (result.codes[:, 5] == 0).all()


def test_gptq_falls_back_to_rtn_when_hessian_is_not_positive_definite():
    weight = torch.randn(4, 16)
    hessian = -torch.eye(16) * 1e6  # negative definite: damping cannot rescue it
    result = gptq_quantize(weight, hessian, WeightGrid(4, True, None, scale_dtype=torch.float32))
    assert result.fallback == "Hessian not positive definite"
    assert torch.equal(result.codes, rtn_quantize(weight, WeightGrid(4, True, None, scale_dtype=torch.float32))[0])


def test_stacked_rows_equal_separate_solves(seeded):
    a, b = torch.randn(8, 64), torch.randn(12, 64)
    hessian, _ = random_hessian(64)
    grid = WeightGrid(4, True, 32, scale_dtype=torch.float32)
    together = gptq_quantize(torch.cat([a, b]), hessian, grid)
    assert torch.equal(together.codes[:8], gptq_quantize(a, hessian, grid).codes)
    assert torch.equal(together.codes[8:], gptq_quantize(b, hessian, grid).codes)


def test_mse_observer_never_worse_than_minmax(seeded):
    weight = torch.randn(16, 64)
    weight[0, 0] = 8.0  # an outlier that min-max spends its range on
    plain = WeightGrid(4, True, 32, scale_dtype=torch.float32)
    searched = WeightGrid(4, True, 32, scale_dtype=torch.float32, mse_search=True)
    errs = []
    for grid in (plain, searched):
        codes, scale, zero = rtn_quantize(weight, grid)
        errs.append((reference_dequant(codes, scale, zero, 32) - weight.double()).pow(2).sum().item())
    assert errs[1] <= errs[0]


def _fp32_dequantization(module: QuantLinear, dtype: torch.dtype) -> torch.Tensor:
    """The formula as first written: every product in fp32, then one cast to `dtype`."""
    codes = module.codes().float().reshape(module.out_features, module.groups, -1)
    zero = module.zero_points()
    if zero is not None:
        codes = codes - zero.float().unsqueeze(-1)
    weight = codes * module.weight_scale.float().unsqueeze(-1)
    return weight.reshape(module.out_features, module.in_features).to(dtype)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantization_in_the_output_dtype_is_bit_identical_to_fp32(bits, symmetric, scale_dtype, dtype, seeded):
    """Where the scale has the output dtype the products are taken in it (half the memory traffic);
    every (scale, output) pair must still give exactly the fp32 formula's values."""
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1)
    codes = torch.randint(low, high, (48, 192), dtype=torch.int8)
    scale = torch.rand(48, 3) * 10.0 ** torch.randint(-6, 1, (48, 3)).float()  # wide exponents: rounding matters
    zero = None if symmetric else torch.randint(low, high, (48, 3), dtype=torch.int8)
    module = QuantLinear.from_codes(codes, scale, zero, bits=bits, group_size=64, bias=None, dtype=scale_dtype)
    fast = module.dequantized_weight(dtype)
    assert fast.dtype == dtype
    assert torch.equal(fast, _fp32_dequantization(module, dtype))
