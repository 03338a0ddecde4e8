"""Merge test inputs: fine-tune-like variants of a checkpoint, made by perturbing its weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def perturbed_copy(source: Path, target: Path, seed: int, scale: float = 0.02, dtype: torch.dtype | None = None) -> Path:
    """A copy of `source` with Gaussian noise (relative to each tensor's std) on every float tensor."""
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and not item.name.endswith(".safetensors") and item.name != "model.safetensors.index.json":
            shutil.copy2(item, target / item.name)
    generator = torch.Generator().manual_seed(seed)
    for file in sorted(source.glob("*.safetensors")):
        tensors = load_file(str(file))
        out = {}
        for name, tensor in tensors.items():
            work = tensor.float()
            noise = torch.randn(work.shape, generator=generator) * scale * (work.std() if work.numel() > 1 else 1.0)
            out[name] = (work + noise).to(dtype or tensor.dtype)
        save_file(out, str(target / file.name), metadata={"format": "pt"})
    if (source / "model.safetensors.index.json").is_file():
        shutil.copy2(source / "model.safetensors.index.json", target / "model.safetensors.index.json")
    return target


def recipe_text(merge_block: str, name: str = "merge-test", extra: str = "") -> str:
    indented = "\n".join("      " + line for line in merge_block.strip().splitlines())
    return f"name: {name}\nstages:\n  - merge:\n{indented}\n{extra}"


# A merge record as compression.json holds it: two Hub inputs (the base listed last) and a local one.
HUB_MERGE = {
    "method": "ties",
    "base": "org/base",
    "models": [
        {"model": "org/math", "hub_id": "org/math"},
        {"model": "/local/ft", "hub_id": None},
        {"model": "org/base", "hub_id": "org/base"},
    ],
}
