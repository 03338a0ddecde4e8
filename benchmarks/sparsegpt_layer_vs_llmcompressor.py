#!/usr/bin/env python
"""One layer, both implementations: our `sparsegpt_prune` against llm-compressor's `sparsify_weight`
(run in benchmarks/.venv-llmcompressor) on the same bf16 weight and float32 Hessian, 2:4, damping 0.01,
block 128. Prints whether the masks and the updated weights are identical.

    python benchmarks/sparsegpt_layer_vs_llmcompressor.py
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import torch

from compressor.algorithms.masks import parse_nm
from compressor.algorithms.sparsegpt import factor_hessian, sparsegpt_prune

LLMC_PYTHON = Path("/work/main/benchmarks/.venv-llmcompressor/bin/python")
THEIRS = """
import sys, torch
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight
d = torch.load(sys.argv[1])
layer = torch.nn.Linear(d["w"].shape[1], d["w"].shape[0], bias=False)
layer.weight.data = d["w"].clone()
_, weight = sparsify_weight(layer, {layer: d["h"].clone()}, 0.5, 2, 4, 128, 0.01, False)
torch.save(weight.detach(), sys.argv[2])
"""


def main() -> None:
    g = torch.Generator().manual_seed(0)
    # correlated inputs with unequal channel scales, as real activations have
    x = (torch.randn(4096, 576, generator=g) @ (torch.randn(576, 576, generator=g) / 24)) * (torch.rand(576, generator=g) * 5 + 0.1)
    hessian = 2 * x.t() @ x / x.shape[0]
    weight = torch.randn(192, 576, generator=g).bfloat16()
    ours = sparsegpt_prune(weight, factor_hessian(hessian.clone(), 0.01), pattern=parse_nm("2:4"), block_size=128).weight
    with tempfile.TemporaryDirectory() as tmp:
        inputs, output = Path(tmp) / "wh.pt", Path(tmp) / "theirs.pt"
        torch.save({"w": weight, "h": hessian}, inputs)
        subprocess.run([str(LLMC_PYTHON), "-c", THEIRS, str(inputs), str(output)], check=True, capture_output=True)
        theirs = torch.load(output).reshape(ours.shape).to(ours.dtype)
    print("identical masks:", torch.equal(ours == 0, theirs == 0))
    print("max |ours - theirs|:", float((ours.float() - theirs.float()).abs().max()))


if __name__ == "__main__":
    main()
