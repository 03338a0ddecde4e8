"""Sparsify task vectors a row slice at a time, so a big tensor never needs a whole-tensor sort.

A selector sees the delta `model - base` twice, as a stream of row slices (chunks):
`prepare` sweeps it (one or more times) to find what to keep, then `select` is called once per
chunk, in order, and returns that chunk sparsified. Memory is a few chunks, not the
float32 keys, int64 indices and sort buffers a `torch.argsort` of the whole tensor needs
(about 20 bytes per entry: 550 MB for SmolLM2's 49152 × 576 embedding).

Magnitude selection keeps the entries whose rank by |delta| (largest first) lies in a window
[lo, hi): TIES keeps [0, k), Breadcrumbs drops the outliers on top and the smallest at the
bottom. Equal magnitudes are ranked by position (the lower flat index counts as larger), so
the kept set is exact and deterministic. The threshold magnitudes are found by radix
selection on the bit patterns of |delta| (non-negative floats order like their bits as
integers): one bincount sweep per 16 bits of the dtype.

Random (DARE) selection draws each entry's Bernoulli keep from a generator seeded by the
selector's seed and the entry's flat block, so `prepare` and `select` draw the very same masks
for any slicing, and the L1 rescale can use whole-tensor norms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import EllipsisType
from typing import Callable, Iterator, Protocol

import torch

RESCALE_EPS = 1e-7
CHUNK_ELEMENTS = 1 << 20  # entries per row slice; 2^21 cost 190 MB more peak RSS on SmolLM2 (heap fragmentation)
DIGIT_BITS = 16
MASK_BLOCK_ELEMENTS = 1 << 16  # DARE draws per flat block; any row slicing cuts the same blocks
_INT_VIEWS = {2: torch.int16, 4: torch.int32, 8: torch.int64}

Chunks = Callable[[], Iterator[torch.Tensor]]  # a fresh sweep over the delta's row slices


def row_slices(
    shape: tuple[int, ...] | torch.Size, max_elements: int | None = CHUNK_ELEMENTS
) -> list[slice | EllipsisType]:
    """Row ranges that cover a tensor with at most `max_elements` entries each (whole: `...`)."""
    numel = 1
    for size in shape:
        numel *= size
    if max_elements is None or len(shape) == 0 or numel <= max_elements:
        return [Ellipsis]
    per_row = max(1, numel // shape[0])
    step = max(1, max_elements // per_row)
    return [slice(start, min(shape[0], start + step)) for start in range(0, shape[0], step)]


def magnitude_bits(delta: torch.Tensor) -> torch.Tensor:
    """|delta| as integers that order exactly like the magnitudes (int32, int64 for float64)."""
    size = delta.element_size()
    bits = delta.abs().reshape(-1).view(_INT_VIEWS[size])
    return bits.to(torch.int32) if size < 4 else bits


def _value_bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits - 1  # the sign bit is 0 after abs()


def select_rank(chunks: Chunks, dtype: torch.dtype, rank: int) -> tuple[int, int]:
    """The magnitude bits of the entry at descending rank `rank` (0 = largest) and how many
    entries are strictly larger, by radix selection over the stream."""
    bits = _value_bits(dtype)
    levels = -(-bits // DIGIT_BITS)
    prefix, known_bits, above = 0, 0, 0
    remaining = rank
    for level in range(levels):
        width = bits - DIGIT_BITS * (levels - 1) if level == 0 else DIGIT_BITS
        shift = bits - known_bits - width
        counts = torch.zeros(1 << width, dtype=torch.int64)
        for delta in chunks():
            keys = magnitude_bits(delta)
            if known_bits:
                keys = keys[(keys >> (shift + width)) == prefix]
            counts += torch.bincount((keys >> shift) & ((1 << width) - 1), minlength=1 << width)
        larger = counts.flip(0).cumsum(0).flip(0) - counts  # entries with a larger digit
        digit = int(((larger <= remaining) & (remaining < larger + counts)).nonzero()[0])
        above += int(larger[digit])
        remaining -= int(larger[digit])
        prefix = (prefix << width) | digit
        known_bits += width
    return prefix, above


class DeltaSelector(Protocol):
    def prepare(self, chunks: Chunks) -> None: ...

    def select(self, index: int, delta: torch.Tensor) -> torch.Tensor: ...


def _l1(delta: torch.Tensor) -> float:
    return float(delta.abs().sum(dtype=torch.float64))


def _rescale_factor(before: float, after: float, dtype: torch.dtype) -> torch.Tensor | None:
    """before / after in the delta's dtype, as a whole-tensor rescale computes it; None: no rescale."""
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return None
    return torch.tensor(before, dtype=dtype) / torch.tensor(after, dtype=dtype)


@dataclass
class _Boundary:
    bits: int  # magnitude at a window edge
    above: int  # entries strictly larger
    seen: int = 0  # entries with this magnitude met so far, in flat order


@dataclass
class RankWindow:
    """Keep the entries of descending magnitude rank in [lo, hi) (ties: lower index first)."""

    lo: int
    hi: int
    rescale: bool
    top: _Boundary | None = None
    bottom: _Boundary | None = None
    factor: torch.Tensor | None = None
    whole: torch.Tensor | None = None  # the kept mask, when the delta comes in one chunk

    def prepare(self, chunks: Chunks) -> None:
        sweep = chunks()
        first = next(sweep)
        dtype = first.dtype
        if next(sweep, None) is None:
            self._prepare_whole(first)
            return
        if self.lo > 0:
            self.top = _Boundary(*select_rank(chunks, dtype, self.lo))
        self.bottom = _Boundary(*select_rank(chunks, dtype, self.hi - 1))
        if self.rescale:
            before = after = 0.0
            for delta in chunks():
                before += _l1(delta)
                after += _l1(delta * self._mask(delta))
            self.factor = _rescale_factor(before, after, dtype)
            for boundary in (self.top, self.bottom):  # `select` counts equal entries from the start again
                if boundary is not None:
                    boundary.seen = 0

    def _prepare_whole(self, delta: torch.Tensor) -> None:
        # Small tensors: a stable sort orders equal magnitudes by index, as the radix path does.
        keys = magnitude_bits(delta)
        order = torch.sort(keys, descending=True, stable=True).indices
        keep = torch.zeros(keys.numel(), dtype=torch.bool)
        keep[order[self.lo : self.hi]] = True
        self.whole = keep.reshape(delta.shape)
        if self.rescale:
            self.factor = _rescale_factor(_l1(delta), _l1(delta * self.whole), delta.dtype)

    def _mask(self, delta: torch.Tensor) -> torch.Tensor:
        if self.whole is not None:
            return self.whole
        keys = magnitude_bits(delta)
        assert self.bottom is not None
        keep = keys > self.bottom.bits
        if self.top is not None:
            keep &= keys < self.top.bits
        boundaries = [self.bottom] if self.top is None or self.top.bits == self.bottom.bits else [self.top, self.bottom]
        for boundary in boundaries:
            equal = keys == boundary.bits
            equals = int(equal.sum())
            first = boundary.above + boundary.seen  # ranks of this chunk's equal entries: [first, first + equals)
            if self.lo <= first and first + equals <= self.hi:
                keep |= equal
            elif first < self.hi and first + equals > self.lo:  # the chunk where the cut falls
                rank = first + equal.cumsum(0) - 1
                keep |= equal & (rank >= self.lo) & (rank < self.hi)
            boundary.seen += equals
        return keep.reshape(delta.shape)

    def select(self, index: int, delta: torch.Tensor) -> torch.Tensor:
        kept = delta * self._mask(delta)
        return kept if self.factor is None else kept * self.factor


@dataclass
class RandomMask:
    """DARE: keep each entry with probability `density`.

    The mask is a function of the entry's flat index and one seed drawn from `generator`
    (one draw per selector, so several inputs sharing a tensor's generator get their own
    seeds): flat blocks of MASK_BLOCK_ELEMENTS entries each take their uniform draws from a
    generator seeded by (seed, block); an entry is kept where its draw is below `density`
    (a Bernoulli(density) draw, 3x faster than `bernoulli_` on CPU). So the mask is the same for any row slicing, a slice
    can be redrawn without any recorded generator state, and the draws of one block reuse one
    small buffer (keeping a generator state per slice and drawing a slice-sized float mask
    left freed slice buffers pinned between small live allocations: +200 MB of heap on
    SmolLM2's embedding)."""

    density: float
    rescale: bool
    generator: torch.Generator | None
    seed: int | None = None
    factor: torch.Tensor | None = None
    _position: int = 0  # flat index where the next `select`ed chunk starts
    _buffer: torch.Tensor | None = field(default=None, repr=False)

    def _keep(self, start: int, delta: torch.Tensor) -> torch.Tensor:
        """The boolean mask of the entries at flat indices [start, start + delta.numel())."""
        assert self.seed is not None
        if self._buffer is None:
            self._buffer = torch.empty(MASK_BLOCK_ELEMENTS, dtype=torch.float32)
        count = delta.numel()
        keep = torch.empty(count, dtype=torch.bool)
        done = 0
        while done < count:
            block, offset = divmod(start + done, MASK_BLOCK_ELEMENTS)
            take = min(MASK_BLOCK_ELEMENTS - offset, count - done)
            block_generator = torch.Generator().manual_seed(_block_seed(self.seed, block))
            torch.rand(MASK_BLOCK_ELEMENTS, generator=block_generator, out=self._buffer)  # the whole block, always
            torch.lt(self._buffer[offset : offset + take], self.density, out=keep[done : done + take])
            done += take
        return keep.reshape(delta.shape)

    @staticmethod
    def _work(delta: torch.Tensor) -> torch.Tensor:
        # float16 deltas are masked and rescaled in float32, bf16 / float32 / float64 in their own dtype.
        return delta.float() if delta.dtype == torch.float16 else delta

    def prepare(self, chunks: Chunks) -> None:
        generator = self.generator if self.generator is not None else torch.default_generator
        self.seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        self._position = 0
        if not self.rescale:
            return
        before = after = 0.0
        dtype = None
        start = 0
        for delta in chunks():
            work = self._work(delta)
            before += _l1(work)
            after += _l1(work * self._keep(start, work))
            start += delta.numel()
            dtype = work.dtype
        if dtype is not None:
            self.factor = _rescale_factor(before, after, dtype)

    def select(self, index: int, delta: torch.Tensor) -> torch.Tensor:
        if index == 0:
            self._position = 0
        work = self._work(delta)
        kept = work * self._keep(self._position, work)
        self._position += delta.numel()
        if self.factor is not None:
            kept = kept * self.factor
        return kept.to(delta.dtype)


def _block_seed(seed: int, block: int) -> int:
    # Distinct, well spread seeds per block (golden-ratio stride), within manual_seed's range.
    return (seed + block * 0x9E3779B97F4A7C15) % (1 << 63)


class Identity:
    def prepare(self, chunks: Chunks) -> None:
        return None

    def select(self, index: int, delta: torch.Tensor) -> torch.Tensor:
        return delta


def largest(numel: int, density: float, rescale: bool) -> DeltaSelector:
    """TIES trimming: the `density` share largest in magnitude (at least one entry)."""
    if density >= 1 or numel == 0:
        return Identity()
    return RankWindow(0, max(1, int(density * numel)), rescale)


def middle(numel: int, density: float, rescale: bool, gamma: float) -> DeltaSelector:
    """Breadcrumbs: drop the `gamma` share largest as outliers and the smallest, keeping a
    `density` share (the outlier cut shrinks when both do not fit)."""
    if density >= 1 or numel == 0:
        return Identity()
    keep = int(density * numel)
    if keep == 0:
        return _Nothing()
    smallest = max(0, numel - keep - int(gamma * numel))
    return RankWindow(numel - smallest - keep, numel - smallest, rescale)


class _Nothing:
    def prepare(self, chunks: Chunks) -> None:
        return None

    def select(self, index: int, delta: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(delta)
