"""Integration: SparseGPT 2:4 on the real SmolLM2-135M-Instruct, saved sparse, reloaded, densified."""

from __future__ import annotations

import json

import pytest

from compressor.algorithms.masks import is_nm_sparse, parse_nm
from compressor.cli import main
from compressor.kernels.sparse_linear import SparseLinear
from compressor.sparse_format import load_sparse_model

pytestmark = pytest.mark.integration

RECIPE = """\
name: smollm2-sparse24
calibration: {samples: 8, seq_len: 128, seed: 0}
stages:
  - prune: {method: sparsegpt, sparsity: "2:4"}
"""


def test_sparsegpt_24_on_smollm2(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "out"
    assert main(["builtin:smollm2-135m-instruct", "--recipe", str(recipe), "-o", str(out), "-q"]) == 0
    record = json.loads((out / "compression.json").read_text())
    base, pruned = record["perplexity"]["base"], record["perplexity"]["compressed"]
    # 2:4 calibrated on 8 short windows costs a lot (measured 225 against 62 on these windows),
    # but a broken mask or update gives thousands.
    assert pruned < 5.0 * base
    assert record["sizes"]["compressed_bytes"] < 0.8 * record["sizes"]["original_bytes"]
    model = load_sparse_model(out)
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == 30 * 7
    assert all(is_nm_sparse(m.dense_weight(), parse_nm("2:4")) for m in layers)
