"""What a stage checkpoint costs on SmolLM2-135M: save + read-back verification, against a stage.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/stage_checkpoint_cost.py [MODEL]

Loads the model, runs one RTN stage (4-bit, group 64) on its MLPs so that the checkpoint holds
packed layers, then times `StageCheckpoints.save` (save_pretrained + compressed-tensors config +
`compressor.load` + bit-for-bit comparison) and `restore`, next to a plain `save_pretrained`.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from compressor.model_io import load_model
from compressor.recipe import parse_recipe_text
from compressor.registry import stage_registry
from compressor.resume import LoopState, StageCheckpoints
from compressor.stages.base import StageContext

RECIPE = """name: bench
stages:
  - quantize: {method: rtn, weights: {bits: 4, group_size: 64}, targets: ["re:.*mlp.*"]}
  - quantize: {method: rtn, weights: {bits: 8, group_size: null}, targets: ["re:.*self_attn.*"]}
"""


def main() -> None:
    reference = sys.argv[1] if len(sys.argv) > 1 else "builtin:smollm2-135m-instruct"
    model = load_model(reference).model
    recipe = parse_recipe_text(RECIPE)
    spec = recipe.stages[0]
    stage = stage_registry().get(spec.kind).implementation
    ctx = StageContext(tokenizer=None, calibration=lambda: torch.zeros(1), device=torch.device("cpu"), show_progress=False)
    plan = stage.plan(model, spec.config, lambda *k: {})
    started = time.perf_counter()
    model = stage.run(model, spec.config, ctx, plan)
    stage_seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        model.save_pretrained(str(Path(tmp) / "plain"))
        plain_seconds = time.perf_counter() - started
        lines: list[str] = []
        checkpoints = StageCheckpoints(Path(tmp) / "work", {"bench": 1}, ["quantize", "quantize"], True, True, lines.append)
        started = time.perf_counter()
        checkpoints.save(0, model, ctx, LoopState([], [], []))
        save_seconds = time.perf_counter() - started
        assert not lines, lines
        started = time.perf_counter()
        _, first = checkpoints.restore(model, ctx, LoopState([], [], []))
        restore_seconds = time.perf_counter() - started
        assert first == 1
        size = sum(p.stat().st_size for p in (Path(tmp) / "work" / "stage-1").glob("*.safetensors"))
    print(f"rtn stage (mlp, w4 g64): {stage_seconds:.2f} s")
    print(f"plain save_pretrained: {plain_seconds:.2f} s")
    print(f"stage checkpoint save + verify: {save_seconds:.2f} s ({save_seconds / plain_seconds:.1f}x a plain save)")
    print(f"restore on --resume: {restore_seconds:.2f} s")
    print(f"checkpoint size: {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
