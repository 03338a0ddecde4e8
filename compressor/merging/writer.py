"""Write a sharded safetensors checkpoint tensor by tensor, holding none of it in memory.

The merge knows every output tensor's name, shape and dtype before it computes any, so each
shard's safetensors header can be written first and the tensor bytes appended as they come.
(`safetensors.torch.save_file` needs the whole shard in memory at once, which is what a
streaming merge must avoid.) The layout is the format's own: an 8-byte little-endian header
length, the JSON header with `data_offsets` per tensor, padded to 8 bytes, then the data.
Shards are cut at `max_shard_bytes`; more than one shard gets `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorSlot:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(slots: list[TensorSlot], max_shard_bytes: int) -> list[list[TensorSlot]]:
    """Consecutive runs of tensors, each at most `max_shard_bytes` (a bigger tensor gets its own)."""
    shards: list[list[TensorSlot]] = [[]]
    size = 0
    for slot in slots:
        if shards[-1] and size + slot.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(slot)
        size += slot.nbytes
    return shards


def _header(slots: list[TensorSlot]) -> bytes:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for slot in slots:
        entries[slot.name] = {"dtype": DTYPE_NAMES[slot.dtype], "shape": list(slot.shape), "data_offsets": [offset, offset + slot.nbytes]}
        offset += slot.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class StreamingCheckpointWriter:
    """Accepts tensors in layout order and appends each to its shard file as it arrives."""

    def __init__(self, folder: Path, slots: list[TensorSlot], max_shard_bytes: int):
        self.folder = folder
        self.shards = plan_shards(slots, max_shard_bytes)
        count = len(self.shards)
        self.file_names = [SINGLE_FILE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self._order = [(shard, slot) for shard, group in enumerate(self.shards) for slot in group]
        self._next = 0
        self._written = 0  # bytes of the current tensor written so far
        self._handle: BinaryIO | None = None
        self._open_shard = -1

    @property
    def next_name(self) -> str | None:
        return self._order[self._next][1].name if self._next < len(self._order) else None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write a whole tensor."""
        slot = self._order[self._next][1]
        if tuple(tensor.shape) != slot.shape:
            raise RuntimeError(f"{name}: planned shape {slot.shape}, got {tuple(tensor.shape)}")
        self.append(name, tensor)

    def append(self, name: str, rows: torch.Tensor) -> None:
        """Write the next rows (leading-dimension slice) of the current tensor; the tensor is
        done when all its bytes have come."""
        shard, slot = self._order[self._next]
        if name != slot.name:
            raise RuntimeError(f"expected tensor {slot.name} next, got {name}")
        if tuple(rows.shape[1:]) != slot.shape[1:] or rows.dtype != slot.dtype:
            raise RuntimeError(f"{name}: planned {slot.shape} {slot.dtype}, got rows {tuple(rows.shape)} {rows.dtype}")
        if shard != self._open_shard:
            self._close()
            self._handle = open(self.folder / self.file_names[shard], "wb")
            self._handle.write(_header(self.shards[shard]))
            self._open_shard = shard
        assert self._handle is not None
        data = rows.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        if self._written + data.numel() > slot.nbytes:
            raise RuntimeError(f"{name}: more data than its planned {slot.nbytes} bytes")
        self._handle.write(memoryview(data.numpy()))
        self._written += data.numel()
        if self._written == slot.nbytes:
            self._next += 1
            self._written = 0

    def _close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def finish(self) -> list[str]:
        """Close the last shard, write the index when sharded; the files written."""
        self._close()
        if self._next != len(self._order):
            raise RuntimeError(f"checkpoint incomplete: {self.next_name} and later tensors were never written")
        if len(self.file_names) > 1:
            weight_map = {slot.name: self.file_names[i] for i, group in enumerate(self.shards) for slot in group}
            total = sum(slot.nbytes for group in self.shards for slot in group)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
            return [*self.file_names, INDEX_FILE]
        return list(self.file_names)

    def close(self) -> None:
        self._close()
