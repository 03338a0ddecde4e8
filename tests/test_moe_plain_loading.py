"""MoE outputs that plain transformers cannot load are announced by the plan (compressor.moe_plain_loading).

Dense experts beside int4/int8 layers, and int8 W8A8 (int-quantized) experts, are saved per expert
as vLLM and llm-compressor expect; transformers' compressed-tensors MoE loader drops those tensors.
The real runs check that the warning is true (and will say when a transformers release fixes it).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import compressor
from compressor.cli import main
from compressor.model_card import build_model_card
from tests.cli_runs import compress_into
from tests.tiny_models import build_tiny_checkpoint
from tests.transformers_versions import COMPRESSED_TENSORS_LOADER_5_23

HEAD = "name: moe\ncalibration: {samples: 4, seq_len: 32}\nstages:\n"
INT4 = "method: rtn, weights: {bits: 4, group_size: 32}"
W8A8 = "method: rtn, weights: {bits: 8, group_size: null}, activations: {bits: 8, dynamic: true}"
FP8 = "method: fp8"
DENSE = "[lm_head, 're:.*experts.*']"
IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 13, 64, 3, 120]])


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("mixtral"), "mixtral", tiny_tokenizer_dir)


def _recipe(method: str, ignore: str) -> str:
    return HEAD + f"  - quantize: {{{method}, ignore: {ignore}}}\n"


def _dry_run_warnings(source: Path, recipe: str, folder: Path, capsys) -> list[str]:
    (folder / "r.yaml").write_text(recipe)
    assert main([str(source), "--recipe", str(folder / "r.yaml"), "--dry-run"]) == 0
    return [line.strip() for line in capsys.readouterr().out.splitlines() if "plain transformers" in line]


@pytest.mark.parametrize(
    ("method", "ignore", "expected"),
    [
        (INT4, DENSE, "experts (model.layers.0.mlp.experts and 1 more) stay dense beside pack-quantized layers"),
        (W8A8, DENSE, "stay dense beside int-quantized layers"),
        (W8A8, "[lm_head]", "saved as int8 W8A8 (int-quantized)"),
        (INT4, "[lm_head]", None),  # packed experts: transformers dequantizes them
        (FP8, DENSE, None),  # dense experts beside FP8 layers pass through its FP8 branch
        (FP8, "[lm_head]", None),
    ],
)
def test_dry_run_warns_when_plain_transformers_cannot_load_the_output(method, ignore, expected, tiny_qwen2_moe, tmp_path, capsys):
    warnings = _dry_run_warnings(tiny_qwen2_moe, _recipe(method, ignore), tmp_path, capsys)
    if expected is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and expected in warnings[0] and "compressor.load reads it" in warnings[0], warnings


@pytest.mark.parametrize(("kind", "method", "ignore"), [("qwen2_moe", INT4, DENSE), ("mixtral", W8A8, "[lm_head]")])
def test_the_warned_outputs_load_in_compressor_but_not_in_plain_transformers(kind, method, ignore, tiny_qwen2_moe, mixtral, tmp_path):
    source = tiny_qwen2_moe if kind == "qwen2_moe" else mixtral
    out = compress_into(source, _recipe(method, ignore), tmp_path)
    with torch.no_grad():
        ours = compressor.load(out)(IDS).logits.float()
        original = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)(IDS).logits.float()
    assert (ours - original).abs().max() < 0.1  # the experts compressor.load reads are the right ones
    # If this stops raising, transformers loads these outputs: drop the warning (moe_plain_loading).
    if COMPRESSED_TENSORS_LOADER_5_23 or kind == "mixtral":
        with pytest.raises(RuntimeError, match="automatic conversion of the weights"):
            AutoModelForCausalLM.from_pretrained(str(out))
    else:  # 5.21/5.22 drop the dense experts and leave them randomly initialised: no usable model either
        _, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
        assert {key for key in info["missing_keys"] if ".mlp.experts." in key}, info
    # The model card's "Use it" section says so too, read from the saved tensors.
    how = "dense (unquantized) beside packed layers" if kind == "qwen2_moe" else "as int8 W8A8 (int-quantized)"
    card = build_model_card(out, "me/moe-out").content
    assert f"Plain transformers ({transformers.__version__} checked) cannot load this MoE checkpoint" in card
    assert f"stores its routed experts {how}" in card and 'compressor.load("me/moe-out")' in card


def test_a_card_of_an_moe_output_with_packed_experts_claims_plain_loading(tiny_qwen2_moe, tmp_path):
    out = compress_into(tiny_qwen2_moe, _recipe(INT4, "[lm_head]"), tmp_path)
    AutoModelForCausalLM.from_pretrained(str(out))  # loads: no note belongs on its card
    assert "cannot load this MoE checkpoint" not in build_model_card(out, "me/moe-out").content
