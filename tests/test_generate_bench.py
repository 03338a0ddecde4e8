"""`compress generate` and `compress bench` on a tiny compressed checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from compressor.cli import main
from tests.cli_runs import compress_into

RECIPE = """\
name: tiny-w4
description: test
calibration: {samples: 4, seq_len: 32}
stages:
  - quantize: {method: rtn, weights: {bits: 4, group_size: 32}, ignore: [lm_head]}
"""


@pytest.fixture(scope="module")
def compressed(tiny_llama, tmp_path_factory) -> Path:
    return compress_into(tiny_llama, RECIPE, tmp_path_factory.mktemp("gen"))


def test_generate_prints_the_greedy_continuation(compressed, capsys):
    import torch
    from transformers import AutoTokenizer

    import compressor

    assert main(["generate", str(compressed), "the model", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out.strip()
    tokenizer = AutoTokenizer.from_pretrained(str(compressed))
    model = compressor.load(compressed)
    ids = tokenizer("the model", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(5):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    expected = tokenizer.decode(ids[0, -5:], skip_special_tokens=True).strip()
    assert printed == expected


def test_bench_reports_speed_and_kernels(compressed, capsys):
    from compressor.kernels.cpu_int4_avx512 import kernel_unavailable

    assert main(["bench", str(compressed), "--tokens", "3", "--prompt-tokens", "4", "--repeats", "1"]) == 0
    printed = capsys.readouterr().out
    assert "compressed" in printed and "dense bf16" in printed and "speed-up:" in printed
    # bf16 decode takes our AVX512-BF16 kernel where the CPU has it, else PyTorch's int4 operator
    expected = "cpu-int4pack" if kernel_unavailable() else "cpu-w4a16-avx512bf16"
    assert f"{expected:<20}   14 layers" in printed
    assert "skipped triton-wxa16: needs a CUDA device" in printed
    assert "model.layers.1.mlp.down_proj" in printed


def test_bench_compiled_decodes_through_one_graph(compressed, capsys, monkeypatch):
    import torch

    compiled_calls = []
    compile_function = torch.compile

    def recording_compile(function, **options):
        compiled_calls.append(options)
        return compile_function(function, **options)

    monkeypatch.setattr(torch, "compile", recording_compile)
    torch._dynamo.reset()
    assert main(["bench", str(compressed), "--tokens", "3", "--prompt-tokens", "4", "--repeats", "1", "--compile"]) == 0
    printed = capsys.readouterr().out
    assert "torch.compile)" in printed and "speed-up:" in printed
    assert compiled_calls == [{"fullgraph": True, "dynamic": False}] * 2  # the compressed model and its twin


def test_generate_on_a_missing_folder_is_a_user_error(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "none"), "hi"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_the_dense_twin_densifies_every_compressed_module_kind(seeded):
    """bench's baseline must be dense: W8A8/FP8, sparse and factorized layers used to stay compressed in it."""
    import torch
    from torch import nn

    from compressor.decode_speed import densified
    from compressor.kernels.lowrank import FactorizedLinear
    from compressor.kernels.quant_linear import QuantLinear
    from compressor.kernels.sparse_linear import SparseLinear
    from compressor.kernels.w8a8_linear import ActivationScheme, W8A8Linear

    weight = torch.randn(24, 32)
    sparse_weight = weight * (torch.rand_like(weight) > 0.5)
    bias = torch.randn(24)
    modules = {
        "quant": QuantLinear.from_codes(torch.randint(-8, 8, (24, 32)), torch.rand(24, 1) / 8, None, bits=4,
                                        group_size=None, bias=bias, dtype=torch.float32),
        "w8a8": W8A8Linear.from_codes(torch.randint(-127, 128, (24, 32), dtype=torch.int8), torch.rand(24) / 100,
                                      weight_type="int", activations=ActivationScheme(), input_scale=None, bias=bias,
                                      dtype=torch.float32),
        "sparse": SparseLinear.from_dense(sparse_weight, bias),
        "factorized": FactorizedLinear(torch.randn(4, 32), torch.randn(24, 4), bias),
    }
    expected = {
        "quant": modules["quant"].dequantized_weight(),
        "w8a8": modules["w8a8"].dequantized_weight(),
        "sparse": sparse_weight,
        "factorized": modules["factorized"].dense_weight(),
    }
    twin = densified(nn.ModuleDict(modules))
    for name, module in twin.items():
        assert type(module) is nn.Linear, name
        assert torch.equal(module.weight, expected[name]) and torch.equal(module.bias, bias), name
    assert type(modules["w8a8"]) is W8A8Linear  # the original is left as it was


def test_bench_refuses_a_checkpoint_without_compressed_layers(tiny_llama, capsys):
    from tests.cli_runs import assert_one_line_refusal, run_cli

    code, err = run_cli(["bench", tiny_llama, "--tokens", "2", "--repeats", "1"], capsys)
    assert_one_line_refusal(code, err, str(tiny_llama), "no compressed layers", "compress generate")


def test_generate_runs_a_plain_checkpoint(tiny_llama, capsys):
    """A dense folder is a model like any other for generate (no compressed layers to swap)."""
    assert main(["generate", str(tiny_llama), "the model", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()


def test_chat_without_a_chat_template_is_refused(compressed, capsys):
    """--chat used to be ignored silently when the tokenizer has no template (the tiny one has none)."""
    from tests.cli_runs import assert_one_line_refusal, run_cli

    code, err = run_cli(["generate", compressed, "hi", "--chat", "--max-new-tokens", "2"], capsys)
    assert_one_line_refusal(code, err, "--chat", "no chat template")
    assert not capsys.readouterr().out


@pytest.mark.parametrize("command", [["generate", "{folder}", "hi"], ["bench", "{folder}"]])
def test_an_unreadable_config_is_one_line(command, compressed, tmp_path, capsys):
    import shutil

    from tests.cli_runs import assert_one_line_refusal, run_cli

    broken = tmp_path / "broken"
    shutil.copytree(compressed, broken)
    (broken / "config.json").write_text("{not json")
    code, err = run_cli([part.format(folder=broken) for part in command], capsys)
    assert_one_line_refusal(code, err, str(broken), "not a valid JSON file")


def test_bench_reports_the_decode_kernel_after_a_long_prefill(compressed, capsys):
    """A 24-token prompt takes the reference path (more than 16 rows); decode then runs the kernel
    bound at load without touching kernel_report, which bench used to print as "reference"."""
    from compressor.kernels.cpu_int4_avx512 import kernel_unavailable

    assert main(["bench", str(compressed), "--tokens", "2", "--prompt-tokens", "24", "--repeats", "1"]) == 0
    printed = capsys.readouterr().out
    expected = "cpu-int4pack" if kernel_unavailable() else "cpu-w4a16-avx512bf16"
    assert f"{expected:<20}   14 layers" in printed and "reference " not in printed
