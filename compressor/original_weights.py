"""Lazy access to a checkpoint's original (uncompressed) weights, one tensor at a time.

EoRA needs W − Ŵ for each compressed layer, but after a quantize stage the model holds only
the packed codes. Rather than keeping a dense copy of every layer alive through the whole
pipeline, the dense weights are re-read from the source checkpoint's safetensors files by
tensor name, when the layer is reached (memory: one layer at a time).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from compressor.errors import CompressionError, ModelError


class OriginalWeights:
    """``weights["model.layers.0.mlp.up_proj.weight"]`` → that tensor, read on demand."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            self._file_of = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise ModelError("holds no *.safetensors weights to read the original layers from", where=str(folder))
            self._file_of = {}
            for file in files:
                with safe_open(str(file), framework="pt") as handle:
                    self._file_of.update({key: file.name for key in handle.keys()})

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._file_of:
            raise CompressionError(f"the original checkpoint {self.folder} has no tensor '{key}'")
        with safe_open(str(self.folder / self._file_of[key]), framework="pt") as handle:
            return handle.get_tensor(key)


def original_weights_for(reference: str) -> OriginalWeights:
    """The original weights of a model reference (a folder, a Hub id in the local cache, GGUF)."""
    path = Path(reference).expanduser()
    if path.is_dir():
        return OriginalWeights(path)
    from compressor.model_io import prepare_source

    source, _load_path, folder = prepare_source(reference)
    if folder is None:
        from huggingface_hub import snapshot_download

        assert source.hub_id is not None
        folder = Path(snapshot_download(source.hub_id, allow_patterns=["*.safetensors", "*.json"]))
    return OriginalWeights(folder)
