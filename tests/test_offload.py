"""`--max-memory`: a model that does not fit is read from disk block by block, and the result
is byte-identical to compressing it in memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compressor.cli import main
from compressor.model_io import load_model
from compressor.offload import has_offloaded_weights, onload, undispatch

RECIPE = """name: offload-gptq
calibration: {samples: 8, seq_len: 64}
stages:
  - quantize: {method: gptq, weights: {bits: 4, group_size: 32}}
"""


def _recipe(tmp_path: Path, text: str = RECIPE) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_small_budget_leaves_blocks_on_disk_and_onload_restores_them(tiny_llama):
    reference = load_model(str(tiny_llama)).model
    offloaded = load_model(str(tiny_llama), max_memory=60_000).model
    assert has_offloaded_weights(offloaded)
    assert "disk" in set(offloaded.hf_device_map.values())
    ids = torch.tensor([[1, 5, 9, 33, 70, 120, 7, 2]])
    with torch.no_grad():
        torch.testing.assert_close(offloaded(ids).logits, reference(ids).logits, rtol=0, atol=0)
    block = offloaded.model.layers[1]
    assert block.mlp.down_proj.weight.device.type == "meta"
    onload(block)
    assert torch.equal(block.mlp.down_proj.weight, reference.model.layers[1].mlp.down_proj.weight)
    undispatch(offloaded)
    assert not has_offloaded_weights(offloaded) and not hasattr(offloaded, "hf_device_map")
    assert all(p.device.type == "cpu" for p in offloaded.parameters())
    assert offloaded.lm_head.weight is offloaded.model.embed_tokens.weight  # tied again


def test_gptq_with_max_memory_equals_gptq_in_memory(tiny_llama, tmp_path):
    recipe = _recipe(tmp_path)
    common = [str(tiny_llama), "--recipe", str(recipe), "-q", "--no-perplexity"]
    assert main(common + ["-o", str(tmp_path / "memory")]) == 0
    assert main(common + ["-o", str(tmp_path / "disk"), "--max-memory", "60KB"]) == 0
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "disk" / name).read_bytes() == (tmp_path / "memory" / name).read_bytes()


def test_a_stage_that_reads_whole_weights_gets_the_model_in_memory_first(tiny_llama, tmp_path):
    recipe = _recipe(tmp_path, RECIPE.replace("method: gptq", "method: rtn"))
    common = [str(tiny_llama), "--recipe", str(recipe), "-q", "--no-perplexity"]
    assert main(common + ["-o", str(tmp_path / "memory")]) == 0
    assert main(common + ["-o", str(tmp_path / "disk"), "--max-memory", "60KB"]) == 0
    assert (tmp_path / "disk" / "model.safetensors").read_bytes() == (tmp_path / "memory" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("size", ["12XB", "0", "-5GB"])
def test_bad_max_memory_is_a_one_line_error(tiny_llama, tmp_path, size, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tiny_llama), "--recipe", "w4a16-gptq", "-o", str(tmp_path / "out"), "--max-memory", size])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--max-memory" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
