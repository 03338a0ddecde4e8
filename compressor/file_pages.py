"""Give back the resident pages of memory-mapped checkpoint weights that are no longer needed.

transformers loads safetensors weights as views of a private memory map of the file, so the
first forward pass makes every dense weight resident (as file-backed pages counted in the
process's RSS), and those pages stay resident after a stage has replaced the weights with
compressed ones. `release_file_pages` drops them with ``madvise(MADV_DONTNEED)``.

Only pages that still hold exactly the file's bytes are dropped: resident (pagemap bit 63)
and file-backed (bit 61). A page some code wrote to has become a private anonymous copy (bit
61 clear) and is left alone, since dropping it would lose the write. So the call never
changes what a tensor reads: a dropped page is read back from the file (usually from the page
cache, without disk I/O) the next time it is touched. Pages shared with a neighbouring tensor
at either end of a tensor are left alone too. Linux only; elsewhere it does nothing.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import torch

_MADV_DONTNEED = 4
_PRESENT = 1 << 63
_FILE_OR_SHARED = 1 << 61
_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class _Mapping:
    start: int
    end: int
    private: bool


def _file_mappings() -> list[_Mapping]:
    """File-backed mappings of this process (marked private or shared), sorted by start address."""
    mappings = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or not fields[5].strip().startswith("/") or fields[4] == "0":
                continue  # anonymous memory, [heap], [stack], ...
            start, end = (int(x, 16) for x in fields[0].split("-"))
            mappings.append(_Mapping(start, end, fields[1].endswith("p")))
    return sorted(mappings, key=lambda m: m.start)


def storage_address(tensor: torch.Tensor) -> int | None:
    """Where the tensor's storage starts in this process's memory (None off the CPU)."""
    return tensor.untyped_storage().data_ptr() if tensor.device.type == "cpu" else None


def _interior_pages(tensor: torch.Tensor) -> tuple[int, int] | None:
    """First and past-the-end page address wholly inside the tensor's storage, if any."""
    storage = tensor.untyped_storage()
    start, size = storage.data_ptr(), storage.nbytes()
    first = -(-start // _PAGE) * _PAGE
    last = (start + size) // _PAGE * _PAGE
    return (first, last) if last > first else None


def _unmodified_runs(pagemap, first: int, last: int) -> list[tuple[int, int]]:
    """Address ranges of resident pages in [first, last) that still hold the file's bytes."""
    count = (last - first) // _PAGE
    pagemap.seek(first // _PAGE * 8)
    raw = pagemap.read(count * 8)
    entries = memoryview(raw).cast("Q")
    runs: list[tuple[int, int]] = []
    run_start = None
    for i in range(len(entries)):
        clean = (entries[i] & _PRESENT) and (entries[i] & _FILE_OR_SHARED)
        if clean and run_start is None:
            run_start = i
        elif not clean and run_start is not None:
            runs.append((first + run_start * _PAGE, first + i * _PAGE))
            run_start = None
    if run_start is not None:
        runs.append((first + run_start * _PAGE, first + len(entries) * _PAGE))
    return runs


def release_file_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Drop the unmodified resident pages of memory-mapped tensors from this process's memory;
    return how many bytes were released. Tensors not backed by a file mapping are skipped."""
    if not sys.platform.startswith("linux"):
        return 0
    mappings = _file_mappings()
    starts = [m.start for m in mappings]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    seen: set[int] = set()
    with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        for tensor in tensors:
            address = storage_address(tensor)
            if address is None or address in seen:
                continue
            seen.add(address)
            pages = _interior_pages(tensor)
            if pages is None:
                continue
            index = bisect.bisect_right(starts, pages[0]) - 1
            if index < 0 or not mappings[index].private or pages[1] > mappings[index].end:
                continue  # not (wholly) inside one private file mapping
            for begin, end in _unmodified_runs(pagemap, *pages):
                # A refusal (never expected for a private file mapping) just leaves the pages.
                if libc.madvise(begin, end - begin, _MADV_DONTNEED) == 0:
                    released += end - begin
    return released
