"""`compressor.load` on every format the pipeline writes, against an independent load of the same folder.

- W8A8 (int-quantized) and FP8 (float-quantized): plain transformers (compressed-tensors decompresses);
- sparse bitmask layers: plain transformers on the `compress densify` copy;
- EoRA compensation (`lowrank_adapter/`): plain transformers plus the adapter applied by peft's format.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from compressor.cli import main
from compressor.kernels.quant_linear import QuantLinear

IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 13, 64, 3, 120]])

HEAD = "name: t\ncalibration: {samples: 8, seq_len: 32}\nstages:\n"
RECIPES = {
    "w8a8": HEAD + "  - quantize: {method: rtn, weights: {bits: 8, group_size: null}, activations: {bits: 8, dynamic: true}}\n",
    "fp8": HEAD + "  - quantize: {method: fp8}\n",
    "sparse": HEAD + "  - prune: {method: magnitude, sparsity: 0.5}\n",
    "eora": HEAD + "  - quantize: {method: rtn, weights: {bits: 4, group_size: 32}}\n  - lowrank: {method: eora, rank: 8}\n",
}


def _compress(model: Path, name: str, tmp_path: Path) -> Path:
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(RECIPES[name])
    out = tmp_path / name
    assert main([str(model), "--recipe", str(recipe), "-o", str(out), "-q", "--no-perplexity"]) == 0
    return out


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def _close(ours: torch.Tensor, reference: torch.Tensor, tolerance: float = 2e-2) -> None:
    assert (ours - reference).abs().max().item() <= tolerance * reference.abs().max().item()


# transformers multiplies the decompressed FP8 weights in bf16, W8A8Linear in fp32: on this random
# tiny model the two roundings differ by up to ~2.5 % of the logit range (measured with and
# without activation quantization), so FP8 gets a wider bound.
@pytest.mark.parametrize("name, module_class, tolerance", [("w8a8", "W8A8Linear", 2e-2), ("fp8", "W8A8Linear", 4e-2)])
def test_eight_bit_formats_load_with_their_modules(name, module_class, tolerance, tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from compressor.runtime import load

    out = _compress(tiny_llama, name, tmp_path)
    model = load(out)
    layers = [m for m in model.modules() if type(m).__name__ == module_class]
    assert len(layers) == 14
    assert not any(isinstance(m, nn.Linear) and "layers." in n for n, m in model.named_modules())
    _close(_logits(model), _logits(AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)), tolerance)


def test_sparse_layers_load_as_sparse_linear(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from compressor.runtime import load

    out = _compress(tiny_llama, "sparse", tmp_path)
    model = load(out)
    sparse = [m for m in model.modules() if type(m).__name__ == "SparseLinear"]
    assert len(sparse) == 14
    dense = tmp_path / "dense"
    assert main(["densify", str(out), str(dense)]) == 0
    _close(_logits(model), _logits(AutoModelForCausalLM.from_pretrained(str(dense), dtype=torch.bfloat16)), 1e-3)


def test_eora_compensation_is_applied_on_load(tiny_llama, tmp_path):
    from compressor.adapters import load_with_adapters
    from compressor.runtime import load

    out = _compress(tiny_llama, "eora", tmp_path)
    assert (out / "lowrank_adapter" / "adapter_config.json").is_file()
    model = load(out)
    compensated = [m for m in model.modules() if isinstance(m, QuantLinear) and hasattr(m, "lowrank")]
    assert len(compensated) == 14
    with_adapter = _logits(model)
    for module in compensated:  # the same model without its compensation must differ
        module._lowrank_hook.remove()
    assert not torch.allclose(with_adapter, _logits(model))
    _close(with_adapter, _logits(load_with_adapters(out, dtype=torch.bfloat16)))
