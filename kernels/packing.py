"""Packing of integer codes into the compressed-tensors ``pack-quantized`` layout.

The bit layout is owned by the ``compressed-tensors`` library; these wrappers only fix the
conventions used across this project (codes are signed int8 in ``[-2^(b-1), 2^(b-1)-1]``).
"""

from __future__ import annotations

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32


def pack_codes(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """int8 codes → int32 words, packed along `dim` (1 for weights, 0 for zero points)."""
    return pack_to_int32(codes.to(torch.int8).contiguous(), bits, packed_dim=dim)


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, int] | torch.Size, dim: int = 1) -> torch.Tensor:
    """int32 words → int8 codes of the original `shape`."""
    if dim == 0:
        # compressed-tensors 0.20 cannot unpack a transposed (non-contiguous) int4 view;
        # unpack the transpose along dim 1 instead, which is the same layout.
        # (A [n, 1] transpose counts as contiguous yet keeps a stride of n, so copy it.)
        rows, cols = shape
        words = torch.empty(packed.shape[::-1], dtype=packed.dtype, device=packed.device).copy_(packed.t())
        return unpack_from_int32(words, bits, torch.Size((cols, rows)), packed_dim=1).t().contiguous()
    return unpack_from_int32(packed, bits, torch.Size(shape), packed_dim=dim)
