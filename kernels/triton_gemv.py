"""Triton W4A16 / W8A16 decode kernel (up to 8 rows) on the compressed-tensors layout.

Why a separate kernel from the tiled one in ``triton_wxa16``: at one row the matmul is a
stream over the packed weight, and the cost per code decides whether it keeps up with memory.
This kernel therefore never reshapes or reduces inside its K loop:

- The weight tile is BLOCK_N rows of WORDS consecutive packed words, loaded as stored.
- For each code position ``i`` inside a word (a static loop), it takes the codes with one
  shift and a mask, and pairs them with the matching activations ``x[k0 + PACK * w + i]``
  (a strided load that hits L1). The products accumulate elementwise into a
  [rows, BLOCK_N, WORDS] fp32 tile; the sum over WORDS happens once, after the loop.
- Codes become floats without an int-to-float instruction: shifted to the top of the
  mantissa and OR-ed into the bits of 1.0, a code c is the float 1 + c / UNIT, exactly
  (UNIT = 2^7 for int4, 2^15 for int8). The products x (1 + c / UNIT) accumulate as they
  are; per tile, subtracting the sum of x and multiplying by UNIT leaves sum x c, with a
  rounding error of about 2^-24 UNIT |x| per product: 2^-17 |x| for int4, 2^-9 |x| for int8
  against products of |x| c (c up to 255), well inside fp32 tests' 1e-4.
- The zero point and the scale are applied once per tile (one group per tile):
  ``sum_i x_i (c_i - z) s = s (sum_i x_i c_i - z sum_i x_i)``.

Split-K without a second kernel: each K slice stores its partial sums to an fp32 workspace
[split, rows, N], then bumps a per-column-tile counter (acquire-release). The slice that
arrives last sums the partials in slice order (deterministic), writes the output and resets
its counter, so the counters (zeroed by the caller) are zero again when the kernel ends.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compressor.kernels.triton_parts import (
    COUNTER_COLUMNS, INTERPRETED, LAUNCH_OPTIONS, block_k, group_scale_and_zero, multiprocessors, split_k_counters, store_split_k,
)

MAX_ROWS = 8
MAX_SPLIT = 8
FLOAT_BITS_ONE = 0x3F800000


def _configs() -> list[triton.Config]:
    if INTERPRETED:
        # split-K, so the interpreter runs the workspace and counter path; tests pass
        # `config` to run the direct store
        return [triton.Config({"BLOCK_N": 16, "SPLIT_K": 2, "PREFETCH": True}, num_warps=1)]
    # (BLOCK_N, SPLIT_K, warps, stages); `_prune` keeps the ones whose program count suits the
    # shape, so a key compiles only a handful of them.
    shapes = ((32, 1, 4, 3), (64, 1, 4, 3), (128, 1, 4, 3), (128, 1, 8, 3),
              (32, 2, 4, 3), (64, 2, 4, 3), (32, 4, 4, 3), (64, 4, 4, 3), (16, 4, 2, 3), (32, 8, 4, 3))
    return [triton.Config({"BLOCK_N": bn, "SPLIT_K": s, "PREFETCH": p}, num_warps=w, num_stages=st)
            for bn, s, w, st in shapes for p in (False, True)]


def _prune(configs: list[triton.Config], named_args: dict, **launch_kwargs) -> list[triton.Config]:
    """Keep configs that launch between one and eight programs per multiprocessor."""
    if INTERPRETED:
        return configs
    n, tiles = named_args["N"], named_args["K"] // launch_kwargs["BLOCK_K"]
    sms = multiprocessors(torch.cuda.current_device())
    kept = []
    for config in configs:
        block_n, split = config.kwargs["BLOCK_N"], config.kwargs["SPLIT_K"]
        programs = -(-n // block_n) * split
        if split <= tiles and sms <= programs <= 8 * sms:
            kept.append(config)
    return kept or configs[:1]


@triton.jit
def code_as_float(words, i: tl.constexpr, BITS: tl.constexpr, CODE_AT: tl.constexpr, one_bits):
    """Code `i` of each (unsigned) word as the float 1 + code / 2^(23 - CODE_AT), exactly: moved
    to mantissa bits CODE_AT.. and OR-ed into the bits of 1.0 (one shift, one mask-and-or)."""
    if i * BITS < CODE_AT:
        moved = words << (CODE_AT - i * BITS)
    elif i * BITS > CODE_AT:
        moved = words >> (i * BITS - CODE_AT)
    else:
        moved = words
    return ((moved & (((1 << BITS) - 1) << CODE_AT)) | one_bits).to(tl.float32, bitcast=True)


@triton.jit
def _gemv_kernel(
    x_ptr, packed_ptr, scale_ptr, zero_ptr, out_ptr, workspace_ptr, counter_ptr,
    M, N, K, GROUPS,
    stride_xm, stride_om,
    M_BUCKET,  # autotune key only
    # 0x3F800000, the bits of 1.0, as an argument rather than a constant: ptxas then reads it
    # from the constant bank instead of re-materializing the immediate in registers dozens of
    # times per K tile (benchmarks/decode_kernel_sass.py: 5.64 -> 5.02 instructions per code)
    float_one_bits,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PACK
    # A code's lowest bit once placed in the float's 23-bit mantissa: the highest multiple of
    # BITS that leaves the code inside it, so one code of each word needs no shift (16 for
    # int4, 8 for int8).
    CODE_AT: tl.constexpr = (23 // BITS - 1) * BITS
    UNIT: tl.constexpr = 1 << (23 - CODE_AT)  # 1 + code / UNIT is the float made from a placed code
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    # K // PACK, not the packed tensor's stride: Triton would know a stride argument to be a multiple
    # of 16 and load four words per thread (LDG.128), which spreads a row's words over fewer threads
    # and costs more activation loads than it saves (decode_kernel_sass.py: 5.03 against 4.66 per code)
    words_per_row = K // PACK  # K is a multiple of BLOCK_K (the wrapper checks)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, WORDS)
    m_mask = offs_m < M
    n_mask = offs_n < N

    tiles = K // BLOCK_K
    per_split = (tiles + SPLIT_K - 1) // SPLIT_K
    t_begin = pid_s * per_split
    t_end = tl.minimum(t_begin + per_split, tiles)

    # 3-D [1, BLOCK_N, WORDS] like the products, so the load's (vectorized) layout is the one the
    # arithmetic uses: a 2-D load converted per code position cost shared-memory round trips
    weight_rows = packed_ptr + offs_n[None, :, None] * words_per_row + offs_w[None, None, :]
    n_mask_3d = n_mask[None, :, None]
    x_rows = x_ptr + offs_m[:, None] * stride_xm + offs_w[None, :] * PACK
    X_PAIRS: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16
    x_pair_rows = x_ptr.to(tl.pointer_type(tl.uint32)) + offs_m[:, None] * (stride_xm // 2) + offs_w[None, :] * (PACK // 2)
    one_bits = float_one_bits.to(tl.uint32, bitcast=True)
    acc = tl.zeros((BLOCK_M, BLOCK_N, WORDS), dtype=tl.float32)
    if PREFETCH:
        # an element-wise form of "this tile is below t_end" (a scalar condition in a mask is
        # not accepted by the interpreter)
        next_words = tl.load(weight_rows + t_begin * WORDS, mask=n_mask_3d & (offs_w[None, None, :] < (t_end - t_begin) * WORDS), other=0)
    for t in range(t_begin, t_end):
        k0 = t * BLOCK_K
        if PREFETCH:  # the next tile's load is in flight while this one is computed
            words = next_words
            next_words = tl.load(weight_rows + (t + 1) * WORDS, mask=n_mask_3d & (offs_w[None, None, :] < (t_end - t - 1) * WORDS), other=0)
        else:
            words = tl.load(weight_rows + t * WORDS, mask=n_mask_3d, other=0)
        # unsigned, so a right shift brings in zeros and needs no sign handling
        words = words.to(tl.uint32, bitcast=True)
        part = tl.zeros((BLOCK_M, BLOCK_N, WORDS), dtype=tl.float32)
        x_sum = tl.zeros((BLOCK_M, 1, WORDS), dtype=tl.float32)  # 3-D: the layout of the products
        if X_PAIRS:
            # bf16 activations read two at a time as one 32-bit word: the low half is x[2j], the
            # high half x[2j + 1], and a bf16 becomes an fp32 by its bits moved up 16
            for j in tl.static_range(PACK // 2):
                pair = tl.load(x_pair_rows + (k0 // 2 + j), mask=m_mask[:, None], other=0)
                x_even = (pair << 16).to(tl.float32, bitcast=True)[:, None, :]
                x_odd = (pair & 0xFFFF0000).to(tl.float32, bitcast=True)[:, None, :]
                part += x_even * code_as_float(words, 2 * j, BITS, CODE_AT, one_bits)
                part += x_odd * code_as_float(words, 2 * j + 1, BITS, CODE_AT, one_bits)
                x_sum += x_even + x_odd
        else:
            for i in tl.static_range(PACK):
                x_i = tl.load(x_rows + (k0 + i), mask=m_mask[:, None], other=0.0).to(tl.float32)[:, None, :]
                part += x_i * code_as_float(words, i, BITS, CODE_AT, one_bits)
                x_sum += x_i
        # one group per tile: BLOCK_K divides GROUP_SIZE
        scale, zero = group_scale_and_zero(scale_ptr, zero_ptr, offs_n, n_mask, k0 // GROUP_SIZE, GROUPS, BITS, HAS_ZERO)
        # sum_i x_i (c_i - z) s = UNIT s (sum_i x_i (1 + c_i / UNIT) - (1 + z / UNIT) sum_i x_i);
        # the factor UNIT is applied once, after the loop
        acc += (part - x_sum * (1.0 + zero / UNIT)[None, :, None]) * scale[None, :, None]
    result = tl.sum(acc, axis=2) * UNIT

    out_mask = m_mask[:, None] & n_mask[None, :]
    store_split_k(result, out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], out_mask,
                  workspace_ptr, offs_m[:, None] * N + offs_n[None, :], M * N, counter_ptr, pid_n, pid_s, SPLIT_K)


_gemv = triton.autotune(
    configs=_configs(), key=["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE"], prune_configs_by={"early_config_prune": _prune},
)(_gemv_kernel)


def wxa16_gemv(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    group_size: int,
    out: torch.Tensor,
    *,
    workspace: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """x [M <= 8, K] times the packed weight's transpose into `out` [M, N]; arguments are
    checked by ``triton_wxa16.wxa16_matmul``. `workspace` [MAX_SPLIT, M, N] fp32 may be passed
    (tests fill it with NaN: the kernel must only read what it wrote), and `counters` (int32,
    zero, one per 16 columns; zero again afterwards). `config` ({"BLOCK_N",
    "SPLIT_K"}, optionally "num_warps"/"num_stages") skips autotuning: tests and the benchmark's
    sweep use it."""
    m, k = x.shape
    n, groups = scale.shape
    if m > MAX_ROWS:
        raise ValueError(f"the decode kernel takes at most {MAX_ROWS} rows, not {m}")
    if config is not None and not (config["BLOCK_N"] >= COUNTER_COLUMNS and 1 <= config["SPLIT_K"] <= MAX_SPLIT):
        raise ValueError(f"config {config}: BLOCK_N must be >= {COUNTER_COLUMNS} and SPLIT_K within 1..{MAX_SPLIT}")
    block_m = 1 << max(m - 1, 0).bit_length()
    if workspace is None:
        workspace = torch.empty(MAX_SPLIT, m, n, dtype=torch.float32, device=x.device)
    if counters is None:  # a memset per call; QuantLinear passes its own instead
        counters = split_k_counters(n, x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
    kernel = _gemv if config is None else _gemv_kernel
    config = None if config is None else {"PREFETCH": True, **config}
    kernel[grid](
        x, packed, scale, zero if zero is not None else packed, out, workspace, counters,
        m, n, k, groups, x.stride(0), out.stride(0), block_m, FLOAT_BITS_ONE,
        BITS=bits, GROUP_SIZE=group_size, HAS_ZERO=zero is not None, BLOCK_M=block_m, BLOCK_K=block_k(group_size),
        **(config or {}), **LAUNCH_OPTIONS,
    )
    return out
