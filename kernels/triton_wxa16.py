"""Triton W4A16 / W8A16 matmul reading the compressed-tensors ``pack-quantized`` layout directly.

``y[m, n] = sum_k x[m, k] * (q[n, k] - z[n, g]) * s[n, g]`` with ``g = k // group_size``;
codes are unsigned (signed code + 2^(bits-1)) packed 32/bits per int32 word along k, zero
points packed the same way along n. No repacking: the checkpoint's tensors are the kernel's.

Each program reads its weight tile as stored, BLOCK_N rows of consecutive packed words along K
(coalesced loads), unpacks the codes in registers, and applies the group's scale once per
tile: the K tile divides the group size, which must be a multiple of 16.

Three launch shapes:
- batch <= 8 (decode): the kernel of ``triton_gemv`` (CUDA cores, no tile reshapes).
- batch 9-16: this kernel with one 16-row tile and split-K. Programs cover (N tiles, K slices);
  each writes its partial sums to an fp32 workspace [split, M, N], and the last slice of each
  column tile to arrive sums them in order (``triton_parts.store_split_k``, as the decode
  kernel does). Rows are reduced with ``tl.dot`` (tensor cores).
- batch > 16: a tiled GEMM with ``tl.dot``, one K slice, writing the output directly.

Under ``TRITON_INTERPRET=1`` (CPU tests) the tiles are small, one config is used (autotune
with several configs needs a GPU), and everything is computed in fp32 (the interpreter's
bf16 arithmetic is not faithful). Set the variable before this module is imported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compressor.kernels.triton_gemv import MAX_ROWS, wxa16_gemv
from compressor.kernels.triton_parts import (
    INTERPRETED, LAUNCH_OPTIONS, MIN_BLOCK_K, block_k, group_scale_and_zero, multiprocessors, split_k_counters, store_split_k,
)

GEMV_ROWS = MAX_ROWS  # up to here the decode kernel of triton_gemv
SPLIT_K_MAX_ROWS = 16  # up to here the tiled kernel splits K (one 16-row tile)


# Few configs: autotuning compiles each one for every new (rows, N, K) key, and a 54-config grid
# took minutes per key on an H100 (2026-11-24). PER_POSITION (one dot per code position, no
# tile reshape) counts 6.4-17.8 SASS instructions per code against 8.5-21 for the reshape
# (benchmarks/decode_kernel_sass.py's method, sm_90) but is untimed, so both are offered and
# the autotuner picks.
def _split_k_configs() -> list[triton.Config]:
    if INTERPRETED:
        return [triton.Config({"BLOCK_N": 16}, num_warps=1)]
    shapes = ((32, 4, 3, False), (64, 4, 3, False), (64, 4, 4, False), (128, 4, 3, False), (128, 8, 3, False), (256, 8, 3, False),
              (64, 4, 3, True), (128, 4, 3, True), (256, 8, 3, True))
    return [triton.Config({"BLOCK_N": bn, "PER_POSITION": p}, num_warps=w, num_stages=s) for bn, w, s, p in shapes]


def _gemm_configs() -> list[triton.Config]:
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1)]
    shapes = ((32, 64, 4, 4, False), (64, 64, 4, 4, False), (64, 128, 4, 3, False), (128, 64, 4, 3, False), (128, 128, 8, 3, False),
              (64, 64, 4, 4, True), (64, 128, 4, 3, True), (128, 128, 8, 3, True))
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "PER_POSITION": p}, num_warps=w, num_stages=s) for bm, bn, w, s, p in shapes]


def per_position_fits(tile_k: int, bits: int) -> bool:
    """PER_POSITION's dots have K = the K tile's words, and tl.dot needs K >= 16."""
    return tile_k // (32 // bits) >= MIN_BLOCK_K


def _prune_per_position(configs: list[triton.Config], named_args: dict, **launch_kwargs) -> list[triton.Config]:
    fits = per_position_fits(launch_kwargs["BLOCK_K"], launch_kwargs["BITS"])
    return [c for c in configs if fits or not c.kwargs.get("PER_POSITION")]


@triton.jit
def _wxa16_kernel(
    x_ptr, packed_ptr, scale_ptr, zero_ptr, out_ptr, workspace_ptr, counter_ptr,
    M, N, K, GROUPS,
    stride_xm, stride_om,
    M_BUCKET,  # autotune key only
    SPLIT_K: tl.constexpr,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    COMPUTE_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PER_POSITION: tl.constexpr = False,
):
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    WORDS: tl.constexpr = BLOCK_K // PACK
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    words_per_row = (K + PACK - 1) // PACK

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N

    # plain integer arithmetic rather than tl.cdiv: a @jit helper, which the interpreter cannot
    # call when triton was imported before TRITON_INTERPRET was set
    tiles_per_split = ((K + BLOCK_K - 1) // BLOCK_K + SPLIT_K - 1) // SPLIT_K
    k_begin = pid_s * tiles_per_split * BLOCK_K
    k_end = tl.minimum(k_begin + tiles_per_split * BLOCK_K, K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        # The weight tile as stored: BLOCK_N rows of BLOCK_K / PACK consecutive words (coalesced),
        # unpacked in registers; codes of one word are consecutive k, lowest bits first.
        offs_w = k0 // PACK + tl.arange(0, WORDS)
        words = tl.load(packed_ptr + offs_n[:, None] * words_per_row + offs_w[None, :],
                        mask=n_mask[:, None] & (offs_w[None, :] < words_per_row), other=0)
        # one group per tile: BLOCK_K divides GROUP_SIZE
        scale, zero = group_scale_and_zero(scale_ptr, zero_ptr, offs_n, n_mask, k0 // GROUP_SIZE, GROUPS, BITS, HAS_ZERO)
        if PER_POSITION:
            # One dot of K = WORDS per code position i: word w's code i pairs with x[k0 + PACK w + i],
            # so the tile is never reshaped (the reshape costs shared-memory round trips)
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            x_rows = x_ptr + offs_m[:, None] * stride_xm + (k0 + tl.arange(0, WORDS)[None, :] * PACK)
            unsigned = words.to(tl.uint32, bitcast=True)  # right shifts bring in zeros
            # codes as floats without int-to-float instructions: OR-ed into the bits of 2^23, a
            # code c is 2^23 + c; subtracting 2^23 + z leaves c - z exactly
            offset = (zero + 8388608.0)[:, None]
            for i in tl.static_range(PACK):
                x_i = tl.load(x_rows + i, mask=m_mask[:, None], other=0.0)
                w_i = (((unsigned >> (i * BITS)) & MASK) | 0x4B000000).to(tl.float32, bitcast=True) - offset
                if COMPUTE_F32:
                    part = tl.dot(x_i.to(tl.float32), tl.trans(w_i), part, input_precision="ieee")
                else:
                    part = tl.dot(x_i, tl.trans(w_i.to(x_i.dtype)), part)
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None] & (offs_k[None, :] < K), other=0.0)
            shifts = tl.arange(0, PACK) * BITS
            w = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & MASK, (BLOCK_N, BLOCK_K)) - zero.to(tl.int32)[:, None]
            if COMPUTE_F32:
                part = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                part = tl.dot(x, tl.trans(w.to(x.dtype)))  # small integers: exact in any float type
        acc += part * scale[None, :]

    # split-K (9-16 rows: one M tile, so pid_n names the column tile) is finished in-kernel
    store_split_k(acc, out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], m_mask[:, None] & n_mask[None, :],
                  workspace_ptr, offs_m[:, None] * N + offs_n[None, :], M * N, counter_ptr, pid_n, pid_s, SPLIT_K)


_prune = {"early_config_prune": _prune_per_position}
_split_k_tile = triton.autotune(configs=_split_k_configs(), key=["M_BUCKET", "N", "K", "SPLIT_K", "BITS", "GROUP_SIZE"], prune_configs_by=_prune)(_wxa16_kernel)
_gemm = triton.autotune(configs=_gemm_configs(), key=["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE"], prune_configs_by=_prune)(_wxa16_kernel)


def _split_k(n: int, k: int, device: torch.device) -> int:
    """K slices for the decode kernel: enough programs to fill the GPU, each slice >= 256 columns."""
    if INTERPRETED:
        return 2 if k > 32 else 1
    sms = multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    n_tiles = -(-n // 64)
    wanted = max(1, (2 * sms) // n_tiles)
    return max(1, min(wanted, k // 256, 16))


def wxa16_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    group_size: int,
    *,
    out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """x [M, K] (fp16/bf16/fp32) times the packed weight's transpose → [M, N] in x's dtype.

    `config` (tile sizes and num_warps/num_stages) fixes the launch instead of autotuning.
    `out` and (for the split-K paths) `workspace` fp32 may be passed in ([split, M, N] for 9-16
    rows, [triton_gemv.MAX_SPLIT, M, N] for up to 8); tests
    fill them with NaN to check that every element is written.
    """
    if bits not in (4, 8):
        raise ValueError(f"wxa16_matmul supports 4 and 8 bits, not {bits}")
    m, k = x.shape
    n, groups = scale.shape
    if k % group_size or k // group_size != groups:
        raise ValueError(f"group size {group_size} with {groups} groups does not cover {k} columns")
    if group_size % MIN_BLOCK_K:
        raise ValueError(f"group size {group_size} is not a multiple of {MIN_BLOCK_K}")
    x = x.contiguous()
    packed, scale = packed.contiguous(), scale.contiguous()
    zero = zero.contiguous() if zero is not None else None
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    compute_f32 = INTERPRETED or x.dtype == torch.float32
    common = dict(
        BITS=bits, GROUP_SIZE=group_size, HAS_ZERO=zero is not None, COMPUTE_F32=compute_f32,
    )
    zero_arg = zero if zero is not None else packed
    m_bucket = 1 << max(m - 1, 0).bit_length()
    common["BLOCK_K"] = block_k(group_size)
    if m <= GEMV_ROWS:
        return wxa16_gemv(x, packed, scale, zero, bits, group_size, out, workspace=workspace, counters=counters, config=config)
    launch = config or {}  # a fixed config skips autotuning (the benchmark's sweep)
    if launch.get("PER_POSITION") and not per_position_fits(common["BLOCK_K"], bits) and not INTERPRETED:
        raise ValueError(f"config {config}: one dot per code position needs {MIN_BLOCK_K} words per K tile")
    if m <= SPLIT_K_MAX_ROWS:
        split = _split_k(n, k, x.device)
        if workspace is None:
            workspace = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
        if counters is None:  # a memset per call; QuantLinear passes its own instead
            counters = split_k_counters(n, x.device)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), split, 1)  # noqa: E731
        (_wxa16_kernel if config else _split_k_tile)[grid](
            x, packed, scale, zero_arg, out, workspace, counters, m, n, k, groups,
            x.stride(0), out.stride(0), m_bucket,
            SPLIT_K=split, BLOCK_M=16, **common, **launch, **LAUNCH_OPTIONS,
        )
        return out
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), 1, triton.cdiv(m, meta["BLOCK_M"]))  # noqa: E731
    (_wxa16_kernel if config else _gemm)[grid](
        x, packed, scale, zero_arg, out, out, packed, m, n, k, groups,  # one K slice: no workspace, no counters
        x.stride(0), out.stride(0), m_bucket,
        SPLIT_K=1, **common, **launch, **LAUNCH_OPTIONS,
    )
    return out
