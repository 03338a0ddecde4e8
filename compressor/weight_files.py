"""Check that a checkpoint folder's weight files can be read, before any loader opens them.

A corrupt or truncated file would otherwise surface deep inside transformers, safetensors or
torch as a traceback; here it becomes a ModelError naming the file. The checks read headers
only (a safetensors header, a pickle's first bytes), never the tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

from compressor.errors import ModelError, first_line

SAFETENSORS_INDEX = "model.safetensors.index.json"
# A torch.save file is a zip archive (torch >= 1.6) or a bare pickle (protocol 2+ starts with 0x80).
TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80")


def safetensors_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards its index names, else every *.safetensors.

    Raises ModelError for an unreadable index, a shard it names that is not there, or no files."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ModelError(f"unreadable shard index ({type(err).__name__}: {err})", where=str(index)) from None
        files = [folder / name for name in names]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise ModelError(f"the shard index names {missing[0].name}, which is not in the folder", where=str(index))
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError("folder holds no weights (*.safetensors)", where=str(folder))
    return files


def check_safetensors_file(file: Path) -> None:
    """Refuse a file whose safetensors header does not parse or whose data it does not cover."""
    from safetensors import SafetensorError, safe_open

    try:
        # Opening parses the header and checks that the file is as long as the header says.
        with safe_open(str(file), framework="pt"):
            pass
    except (SafetensorError, OSError) as err:
        raise ModelError(f"not a readable safetensors file, corrupt or truncated ({first_line(err)})", where=str(file)) from None


def check_pickle_file(file: Path) -> None:
    """Refuse a .bin/.pt file that is neither a torch zip archive nor a pickle (junk, or empty)."""
    with file.open("rb") as handle:
        head = handle.read(4)
    if not head.startswith(TORCH_FILE_STARTS):
        raise ModelError("not a PyTorch checkpoint (neither a zip archive nor a pickle)", where=str(file))


def has_safetensors(folder: Path) -> bool:
    """Whether `from_pretrained` reads safetensors here (files, or a shard index) rather than pickles."""
    return any(folder.glob("*.safetensors")) or (folder / SAFETENSORS_INDEX).is_file()


def check_weight_files(folder: Path, pickles: list[Path]) -> None:
    """Check the files `from_pretrained` will read: the safetensors, else the allowed pickles."""
    if has_safetensors(folder):
        for file in safetensors_files(folder):
            check_safetensors_file(file)
        return
    for file in pickles:
        check_pickle_file(file)
