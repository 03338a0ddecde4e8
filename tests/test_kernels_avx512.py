"""Our AVX512-BF16 W4A16 decode kernel (kernels/csrc/w4a16_avx512bf16.c) through QuantLinear."""

from __future__ import annotations

import pytest
import torch

from compressor.kernels import native_build
from compressor.kernels.dispatch import REFERENCE
from compressor.kernels.cpu_int4_avx512 import MAX_ROWS, CpuAvx512W4Backend, kernel_unavailable, pack_w4
from compressor.transformers_names import cache_argument, returned_cache
from tests.kernel_fixtures import TOLERANCE, float64_reference, random_quant_linear, relative_error

AVX512 = CpuAvx512W4Backend.name
needs_kernel = pytest.mark.skipif(kernel_unavailable() is not None, reason=str(kernel_unavailable()))


def unpack_w4_layout(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of pack_w4, written element by element from the layout comment in the C source."""
    data = packed.tolist()
    codes = torch.empty(n, k, dtype=torch.int8)
    quads = k // 4
    for tile in range(n // 64):
        for quad in range(quads):
            for t in range(4):
                base = (tile * quads + quad) * 128 + 32 * t
                for j in range(16):
                    for s in range(2):
                        byte = data[base + 2 * j + s]
                        row = 64 * tile + 16 * t + j
                        codes[row, 4 * quad + s] = (byte & 0xF) - 8
                        codes[row, 4 * quad + 2 + s] = (byte >> 4) - 8
    return codes


def test_pack_layout_round_trips():
    codes = torch.randint(-8, 8, (128, 24), dtype=torch.int8)
    assert torch.equal(unpack_w4_layout(pack_w4(codes), 128, 24), codes)


# (out, in, group, symmetric): odd row counts (padded to 64 inside), per-channel, group 16 and 256
CASES = [(40, 96, 32, True), (24, 192, 64, False), (17, 256, 128, True), (33, 160, None, False),
         (130, 512, 256, False), (64, 48, 16, True), (576, 576, 64, True)]


@needs_kernel
@pytest.mark.parametrize("n,k,group,symmetric", CASES)
@pytest.mark.parametrize("rows", [1, 3, MAX_ROWS])
def test_kernel_matches_float64_reference(n, k, group, symmetric, rows):
    layer = random_quant_linear(n, k, bits=4, group_size=group, symmetric=symmetric, dtype=torch.bfloat16, bias=True)
    x = torch.randn(2, rows, k).to(torch.bfloat16)[1]  # a view at an offset: the kernel must honour it
    with torch.no_grad():
        fast = layer(x)
    assert layer.kernel_report["kernel"] == AVX512
    assert fast.dtype == torch.bfloat16 and fast.shape == (rows, n)
    # one bf16 rounding of the output: well inside the bf16 tolerance (measured ~2e-3)
    assert relative_error(fast, float64_reference(layer, x)) <= TOLERANCE[torch.bfloat16] / 2


@needs_kernel
def test_leading_dimensions_are_kept_and_padding_rows_dropped():
    layer = random_quant_linear(40, 96, bits=4, group_size=32, symmetric=False, dtype=torch.bfloat16, bias=True)
    x = torch.randn(2, 3, 96).to(torch.bfloat16).transpose(0, 1)  # not contiguous: the kernel needs a copy
    with torch.no_grad():
        out = layer(x)
    assert layer.kernel_report["kernel"] == AVX512 and out.shape == (3, 2, 40)
    assert relative_error(out, float64_reference(layer, x)) <= TOLERANCE[torch.bfloat16] / 2


@needs_kernel
def test_fp32_keeps_the_int4pack_operator_and_prefill_the_dense_path():
    layer = random_quant_linear(40, 96, bits=4, group_size=32, symmetric=True, dtype=torch.bfloat16)
    with torch.no_grad():
        layer(torch.randn(MAX_ROWS + 1, 96).to(torch.bfloat16))
        assert layer.kernel_report["kernel"] == REFERENCE  # prefill: dequantize + dense matmul
        assert f"more than {MAX_ROWS} rows" in layer.kernel_report["skipped"][AVX512]
        layer32 = random_quant_linear(40, 96, bits=4, group_size=32, symmetric=True, dtype=torch.float32)
        layer32(torch.randn(1, 96))
        assert layer32.kernel_report["kernel"] == "cpu-int4pack"
        assert "bf16 activations" in layer32.kernel_report["skipped"][AVX512]


def test_switch_turns_the_native_kernel_off(monkeypatch):
    monkeypatch.setenv(native_build.SWITCH, "0")
    layer = random_quant_linear(40, 96, bits=4, group_size=32, symmetric=True, dtype=torch.bfloat16)
    with torch.no_grad():
        layer(torch.randn(1, 96).to(torch.bfloat16))
    assert layer.kernel_report["kernel"] == "cpu-int4pack"
    assert "switched off" in layer.kernel_report["skipped"][AVX512]


def test_a_failed_build_is_an_error_with_the_compiler_output(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path))
    source = tmp_path / "broken.c"
    source.write_text("this is not C\n")
    compiler = native_build._compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    with pytest.raises(RuntimeError, match="failed"):
        native_build._build(source, compiler)
    assert not list((tmp_path / "native").glob("*.so*"))  # no half-written library is left behind


@needs_kernel
def test_packed_form_follows_buffer_changes_and_input_kind():
    layer = random_quant_linear(64, 128, bits=4, group_size=64, symmetric=False, dtype=torch.bfloat16)
    other = random_quant_linear(64, 128, bits=4, group_size=64, symmetric=False, dtype=torch.bfloat16)
    x = torch.randn(1, 128).to(torch.bfloat16)
    with torch.no_grad():
        layer(x)
        three = torch.randn(3, 128).to(torch.bfloat16)
        assert relative_error(layer(three), float64_reference(layer, three)) <= 5e-3
        layer.weight_scale.mul_(2)  # in place: the packed scales must follow
        assert relative_error(layer(x), float64_reference(layer, x)) <= 5e-3
        assert layer.kernel_report["kernel"] == AVX512
        layer.load_state_dict(other.state_dict())
        assert relative_error(layer(x), float64_reference(other, x)) <= 5e-3
        layer.float()
        assert layer(x.float()).dtype == torch.float32 and layer.kernel_report["kernel"] == "cpu-int4pack"


@needs_kernel
@pytest.mark.parametrize("symmetric", [True, False])
def test_cached_decode_matches_plain_transformers_dense_load(tiny_llama, tmp_path, symmetric):
    """Token-by-token decode (batch 1, KV cache) through compressor.load runs our kernel and keeps
    the logits of transformers' own bf16 dense load of the same checkpoint (which cannot load
    asymmetric int4: there the reference is the checkpoint dequantized into plain bf16 Linears)."""
    from transformers import AutoModelForCausalLM

    import compressor
    from compressor.cli import main
    from compressor.decode_speed import densified
    from compressor.runtime import kernel_summary

    recipe = tmp_path / "r.yaml"
    weights = f"{{bits: 4, group_size: 32, symmetric: {str(symmetric).lower()}}}"
    recipe.write_text(
        "name: t\ndescription: t\ncalibration: {samples: 4, seq_len: 32}\nstages:\n"
        f"  - quantize: {{method: rtn, weights: {weights}, ignore: [lm_head]}}\n"
    )
    assert main([str(tiny_llama), "--recipe", str(recipe), "-o", str(tmp_path / "out"), "-q", "--no-perplexity"]) == 0
    ours = compressor.load(tmp_path / "out", dtype=torch.bfloat16)
    if symmetric:
        dense = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.bfloat16)
    else:
        dense = densified(ours)
    ids = torch.tensor([[1, 5, 9, 33, 70, 120]])
    with torch.no_grad():
        for model in (ours, dense):
            name = cache_argument(model)
            out = model(input_ids=ids[:, :3], use_cache=True)
            steps = [model(input_ids=ids[:, 3:4], **{name: returned_cache(out)}, use_cache=True)]
            for i in range(4, 6):
                steps.append(model(input_ids=ids[:, i : i + 1], **{name: returned_cache(steps[-1])}, use_cache=True))
            model.decoded = torch.cat([s.logits.float() for s in steps], dim=1)
    assert {r["kernel"] for r in kernel_summary(ours).values()} == {AVX512}
    reference = dense.decoded
    assert (ours.decoded - reference).abs().max().item() <= 2e-2 * reference.abs().max().item()
