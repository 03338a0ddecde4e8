"""`compress finetune --packing`: several examples per sequence of at most --max-length tokens,
none of them attending to another.

Bins: best-fit decreasing (TRL's default ``packing_strategy="bfd"``): the examples, longest first,
each go into the open sequence with the least room left that still holds them, else into a new
one. Examples are never split; one longer than --max-length was already cut by ``load_examples``.

Isolation: positions restart at 0 at every example and the batch carries no attention mask.
transformers' ``masking_utils`` (5.x: ``_preprocess_mask_arguments`` → ``find_packed_sequence_indices``)
then reads the example boundaries from the position ids (wherever a position is not the previous
one + 1) and builds a block-diagonal causal mask for the sdpa, eager and flex implementations. It
does so only when the 2D attention mask is None and there is no KV cache, hence ``use_cache=False``
in every forward. Flash attention reads boundaries from position ids only for a single flattened
row (``_is_packed_sequence``: batch size 1), and implementations outside the mask registry get no
mask at all: ``--packing`` refuses both rather than let examples attend to each other.

Labels: the loss at position t predicts token t + 1, so the first token of every example keeps
IGNORE_INDEX (in an unpacked row it is never predicted either): no label crosses a boundary and
a packed batch has exactly the labelled tokens of its examples. A shorter row of a batch is
padded with a segment of its own (positions 0, 1, …, labels ignored), which nothing real attends to.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Sequence

from compressor.errors import UserError
from compressor.finetune_data import IGNORE_INDEX, Example, padded_ids_and_labels


@dataclass
class PackedSequence:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    examples: int  # how many examples it holds


@dataclass(frozen=True)
class PackingStats:
    examples: int
    sequences: int
    tokens: int
    max_length: int

    @property
    def fill(self) -> float:
        """Real tokens over the sequences' capacity (sequences × max length)."""
        return self.tokens / max(1, self.sequences * self.max_length)

    def line(self) -> str:
        return (f"packing: {self.examples} examples into {self.sequences} sequences of up to {self.max_length} tokens"
                f" ({self.fill:.0%} full)")


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `capacity`; deterministic (ties by index)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (space left, bin index), sorted
    for index in order:
        size = lengths[index]
        if size > capacity:
            raise ValueError(f"an example of {size} tokens does not fit in {capacity}")
        slot = bisect.bisect_left(room, (size, -1))
        if slot < len(room):
            left, chosen = room.pop(slot)
        else:
            left, chosen = capacity, len(bins)
            bins.append([])
        bins[chosen].append(index)
        if left - size > 0:
            bisect.insort(room, (left - size, chosen))
    return bins


def _concatenate(examples: Sequence[Example]) -> PackedSequence:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for example in examples:
        ids += example.input_ids
        labels += [IGNORE_INDEX] + example.labels[1:]  # the first token is no prediction of the previous example
        positions += range(len(example.input_ids))
    return PackedSequence(ids, labels, positions, len(examples))


def pack_examples(examples: Sequence[Example], max_length: int) -> tuple[list[PackedSequence], PackingStats]:
    bins = best_fit_decreasing([len(e.input_ids) for e in examples], max_length)
    packed = [_concatenate([examples[i] for i in members]) for members in bins]
    stats = PackingStats(len(examples), len(packed), sum(len(p.input_ids) for p in packed), max_length)
    return packed, stats


def collate_packed(rows: list[PackedSequence], pad_id: int) -> dict[str, Any]:
    """input_ids, labels and position_ids; no attention_mask (its absence is what turns the
    boundary detection on). A shorter row is padded with a segment of its own."""
    import torch

    ids, labels = padded_ids_and_labels(rows, pad_id)
    width = ids.shape[1]
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        n = len(row.input_ids)
        positions[index, :n] = torch.tensor(row.position_ids)
        positions[index, n:] = torch.arange(width - n)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


# Implementations whose mask transformers builds from a mask function, packed boundaries included.
MASKED_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")


def refuse_unmasked_attention(model) -> None:
    """--packing needs an attention implementation whose mask transformers builds from the
    position ids of a multi-row batch; any other would let packed examples attend to each other."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation not in MASKED_IMPLEMENTATIONS or implementation not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        raise UserError(f"the model's attention implementation {implementation!r} gets no packed-sequence mask from"
                        f" transformers for batches of several rows, so packed examples would attend to each other;"
                        f" packing needs one of {', '.join(MASKED_IMPLEMENTATIONS)}", where="--packing")
