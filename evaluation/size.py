"""Size accounting of a saved checkpoint, measured from its safetensors files.

- ``size_bytes``: bytes of the ``*.safetensors`` files on disk.
- ``parameters``: logical parameters; a packed layer counts the weights it stands for
  (its ``weight_shape``), and quantization scales, zero points and group indices are not
  parameters.
- ``bits_per_weight``: over the compressed layers (see ``LAYOUTS``: compressed-tensors'
  ``weight_packed``, or ``weight`` with a ``weight_scale``; our sparse bitmask; bitsandbytes
  4-bit), every stored tensor of the layer's weight (packed values, scales, zero points, group
  index, bitmask, bitsandbytes' block state) in bits, divided by the weights it stands for. A checkpoint with no compressed layer reports the same figure
  over its decoder's 2-D ``*.weight`` matrices (embeddings and ``lm_head`` left out), which is
  the storage width of its dtype (16.0 for bf16).

Tensor sizes come from each file's header (the safetensors format: an 8-byte little-endian
header length, then a JSON header with every tensor's dtype, shape and byte range), so no
weight is read except the tiny ``weight_shape`` vectors.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# Tensors of a quantized layer that describe its weight but are not parameters.
_WEIGHT_AUXILIARY = {"weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape", "weight_global_scale"}
_ACTIVATION_AUXILIARY = {"input_scale", "input_zero_point", "output_scale", "output_zero_point"}
_NOT_DECODER_MATRIX = ("embed", "lm_head", "wte", "wpe")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SizeInfo:
    size_bytes: int
    bits_per_weight: float | None
    parameters: int
    compressed_layers: int
    compressed_weights: int = 0  # the weights the compressed layers stand for
    stored_as: str = "safetensors"  # the file format measured; a GGUF file also names its tensor types

    @property
    def bits_per_parameter(self) -> float:
        """Every byte on disk over every parameter: the whole checkpoint's average width."""
        return 8 * self.size_bytes / max(self.parameters, 1)


def read_safetensors_header(path: Path) -> list[TensorInfo]:
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < length <= size - 8:
            raise ValueError(f"{path.name} is not a safetensors file (bad header length)")
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            raise ValueError(f"{path.name} is not a safetensors file (header is not JSON)") from None
    return [
        TensorInfo(name, entry["dtype"], tuple(entry["shape"]), entry["data_offsets"][1] - entry["data_offsets"][0], path)
        for name, entry in header.items()
        if name != "__metadata__"
    ]


def _split(name: str) -> tuple[str, str]:
    """(module, leaf); bitsandbytes' 4-bit state (``X.weight.absmax``, ``X.weight.quant_state.*``)
    belongs to module ``X`` as leaves ``weight.absmax``, ``weight.quant_state.*``."""
    if ".weight." in name:
        module, _, rest = name.partition(".weight.")
        return module, f"weight.{rest}"
    module, _, leaf = name.rpartition(".")
    return module, leaf


def _tensor_values(tensor: TensorInfo) -> list[int]:
    from safetensors import safe_open

    with safe_open(str(tensor.file), framework="pt") as handle:
        return [int(v) for v in handle.get_tensor(tensor.name).reshape(-1).tolist()]


def _shape_tensor_weights(leaves: dict[str, TensorInfo]) -> int:
    return math.prod(_tensor_values(leaves["weight_shape"]))


def _bnb_4bit_weights(leaves: dict[str, TensorInfo]) -> int:
    """bitsandbytes keeps the original shape in a JSON blob stored as a uint8 tensor."""
    (state,) = [t for leaf, t in leaves.items() if leaf.startswith("weight.quant_state.bitsandbytes__")]
    return math.prod(json.loads(bytes(_tensor_values(state)))["shape"])


@dataclass(frozen=True)
class CompressedLayout:
    """A way a compressed layer's weight is stored: how to spot it, and how many weights it stands for."""

    name: str
    matches: Callable[[dict[str, TensorInfo]], bool]
    weights: Callable[[dict[str, TensorInfo]], int]


# Checked in order; a layer matching none is a plain one. Every tensor whose leaf starts with
# "weight" (values, scales, zero points, group index, bitmask, bitsandbytes' state) is stored weight.
LAYOUTS = (
    CompressedLayout("pack-quantized", lambda leaves: "weight_packed" in leaves, _shape_tensor_weights),
    CompressedLayout("sparse-bitmask", lambda leaves: "weight_bitmask" in leaves and "weight_values" in leaves, _shape_tensor_weights),
    CompressedLayout(
        "bitsandbytes-4bit",
        lambda leaves: "weight" in leaves and any(leaf.startswith("weight.quant_state.bitsandbytes__") for leaf in leaves),
        _bnb_4bit_weights,
    ),
    CompressedLayout("int-or-float-quantized", lambda leaves: "weight" in leaves and "weight_scale" in leaves, lambda leaves: leaves["weight"].numel),
)


def compressed_layout(leaves: dict[str, TensorInfo]) -> CompressedLayout | None:
    return next((layout for layout in LAYOUTS if layout.matches(leaves)), None)


def measure_checkpoint(folder: Path) -> SizeInfo:
    files = sorted(Path(folder).glob("*.safetensors"))
    tensors = [t for f in files for t in read_safetensors_header(f)]
    modules: dict[str, dict[str, TensorInfo]] = {}
    for tensor in tensors:
        module, leaf = _split(tensor.name)
        modules.setdefault(module, {})[leaf] = tensor

    parameters = 0
    stored_bits = 0
    represented = 0
    compressed = 0
    for module, leaves in modules.items():
        layout = compressed_layout(leaves)
        if layout is not None:
            compressed += 1
            weights = layout.weights(leaves)
            represented += weights
            parameters += weights
            stored_bits += 8 * sum(t.nbytes for leaf, t in leaves.items() if leaf.startswith("weight") and leaf != "weight_shape")
            parameters += sum(t.numel for leaf, t in leaves.items() if not leaf.startswith("weight") and leaf not in _ACTIVATION_AUXILIARY)
        else:
            parameters += sum(t.numel for leaf, t in leaves.items() if leaf not in _WEIGHT_AUXILIARY | _ACTIVATION_AUXILIARY)

    if compressed == 0:
        for module, leaves in modules.items():
            weight = leaves.get("weight")
            if weight is not None and len(weight.shape) == 2 and not any(k in module for k in _NOT_DECODER_MATRIX):
                represented += weight.numel
                stored_bits += 8 * weight.nbytes
    bits = stored_bits / represented if represented else None
    return SizeInfo(
        size_bytes=sum(f.stat().st_size for f in files),
        bits_per_weight=bits,
        parameters=parameters,
        compressed_layers=compressed,
        compressed_weights=represented if compressed else 0,
    )


def measure_model_files(gguf_file: Path | None, folder: Path | None) -> SizeInfo | None:
    """A model's size as the user gave it: a GGUF file's own (not that of its dequantized
    conversion, which is what gets scored), else its safetensors folder's; None if neither is local."""
    if gguf_file is not None:
        from compressor.evaluation.gguf_size import measure_gguf

        return measure_gguf(gguf_file)
    return measure_checkpoint(folder) if folder is not None else None
