"""Measure a saved checkpoint from its safetensors headers: parameters, bytes, bits per weight.

Only the JSON headers are read (plus the two-number `weight_shape` tensors of packed
layers), so this is instant even for a large checkpoint. A compressed-tensors layer stores
its weight as `weight_packed` with `weight_scale` / `weight_zero_point` / `weight_g_idx`
beside it and its logical shape in `weight_shape`; every such tensor counts toward that
layer's bytes, and the logical shape gives its number of weights.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

_INT_FORMATS = {"I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b", "U64": "<Q", "U32": "<I", "U16": "<H", "U8": "<B"}


@dataclass(frozen=True)
class CheckpointSize:
    """What a checkpoint folder's weight files hold."""

    file_bytes: int  # the *.safetensors files on disk
    parameters: int  # logical weights (a packed layer counts its unpacked shape)
    compressed_parameters: int  # the weights of layers stored packed
    compressed_bytes: int  # bytes of those layers (packed weights, scales, zero points, shapes)

    @property
    def bits_per_parameter(self) -> float:
        return 8 * self.file_bytes / max(self.parameters, 1)

    @property
    def bits_per_compressed_weight(self) -> float | None:
        if not self.compressed_parameters:
            return None
        return 8 * self.compressed_bytes / self.compressed_parameters


def _read_header(path: Path) -> tuple[dict, int]:
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def _read_ints(path: Path, start: int, entry: dict) -> list[int]:
    fmt = _INT_FORMATS[entry["dtype"]]
    begin, end = entry["data_offsets"]
    with path.open("rb") as handle:
        handle.seek(start + begin)
        raw = handle.read(end - begin)
    size = struct.calcsize(fmt)
    return [struct.unpack(fmt, raw[i : i + size])[0] for i in range(0, len(raw), size)]


def _nbytes(entry: dict) -> int:
    begin, end = entry["data_offsets"]
    return end - begin


def measure_checkpoint(folder: Path) -> CheckpointSize:
    """Sizes of the weights in `folder` (every *.safetensors file, shards included)."""
    files = sorted(folder.glob("*.safetensors"))
    parameters = compressed_parameters = compressed_bytes = 0
    for path in files:
        header, data_start = _read_header(path)
        packed_layers = {name.removesuffix(".weight_packed") for name in header if name.endswith(".weight_packed")}
        for name, entry in header.items():
            layer, _, leaf = name.rpartition(".")
            if layer in packed_layers and leaf.startswith("weight_"):
                compressed_bytes += _nbytes(entry)
                if leaf == "weight_shape":
                    count = math.prod(_read_ints(path, data_start, entry))
                    compressed_parameters += count
                    parameters += count
                continue
            parameters += math.prod(entry["shape"])
    return CheckpointSize(
        file_bytes=sum(p.stat().st_size for p in files),
        parameters=parameters,
        compressed_parameters=compressed_parameters,
        compressed_bytes=compressed_bytes,
    )
