"""What both W4A16/W8A16 kernels share (the decode kernel in ``triton_gemv``, the tensor-core
tiles in ``triton_wxa16``): the K tile, the split-K counters, and two device functions."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Set before this module is first imported: the interpreter is chosen when triton.language is.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
MIN_BLOCK_K = 16  # tl.dot's smallest K; group sizes must be multiples of it
COUNTER_COLUMNS = 16  # one split-K counter per this many output columns: the smallest N tile
# Compile options every launch passes. Multiply-adds must fuse into one FFMA per code: Triton 3.9
# fuses by default but warns that 3.10 will not (benchmarks/decode_kernel_sass.py counts the FFMAs).
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def block_k(group_size: int) -> int:
    """The K tile: the largest power of two <= 128 dividing the group size, so a tile never
    straddles two groups and its scale is one value per row (the group must be a multiple of 16)."""
    tile = 128
    while tile > MIN_BLOCK_K and group_size % tile:
        tile //= 2
    return tile


@functools.cache
def multiprocessors(device_index: int) -> int:
    """The GPU's multiprocessor count: how many programs fill it (the kernels' split-K and pruning)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_k_counters(columns: int, device: torch.device) -> torch.Tensor:
    """Zeroed counters for ``store_split_k``, enough for `columns` outputs at any N tile; the
    kernels leave them zero, so a layer allocates them once."""
    return torch.zeros(-(-columns // COUNTER_COLUMNS), dtype=torch.int32, device=device)


@triton.jit
def group_scale_and_zero(scale_ptr, zero_ptr, offs_n, n_mask, group, GROUPS, BITS: tl.constexpr, HAS_ZERO: tl.constexpr):
    """Rows `offs_n`' scale and zero point of one group, both fp32. Zero points are packed
    32 / BITS per int32 word along the rows; symmetric layers have the code offset 2^(BITS-1)."""
    PACK: tl.constexpr = 32 // BITS
    scale = tl.load(scale_ptr + offs_n * GROUPS + group, mask=n_mask, other=0.0).to(tl.float32)
    if HAS_ZERO:
        zero_words = tl.load(zero_ptr + (offs_n // PACK) * GROUPS + group, mask=n_mask, other=0)
        zero = ((zero_words >> ((offs_n % PACK) * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
    else:
        zero = tl.zeros(offs_n.shape, tl.float32) + (1 << (BITS - 1))
    return scale, zero


@triton.jit
def store_split_k(result, out_ptrs, out_mask, workspace_ptr, tile, slice_stride, counter_ptr, pid_n, pid_s, SPLIT_K):
    """Write one K slice's fp32 `result` for a column tile, finishing split-K in the same kernel.

    With one slice it goes straight to `out_ptrs`. Otherwise each slice stores its partial sums
    at `workspace_ptr + pid_s * slice_stride + tile`, then bumps the tile's counter
    (acquire-release: its stores are visible before its count, and the slice that reads the last
    count sees every other slice's stores). That last slice sums the partials in slice order
    (deterministic), writes the output and resets the counter to zero for the next launch.
    """
    if SPLIT_K == 1:
        tl.store(out_ptrs, result.to(out_ptrs.dtype.element_ty), mask=out_mask)
    else:
        tl.store(workspace_ptr + pid_s * slice_stride + tile, result, mask=out_mask)
        arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros(result.shape, dtype=tl.float32)
            for s in range(0, SPLIT_K):
                total += tl.load(workspace_ptr + s * slice_stride + tile, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptrs, total.to(out_ptrs.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(counter_ptr + pid_n, 0)
