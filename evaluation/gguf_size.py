"""Size accounting of a ``.gguf`` file, measured from its tensor table.

A GGUF model is scored as transformers' dequantized load of it, but its size is the file's:
a report that sized it from that conversion would show a 4-bit GGUF as a 16-bit model.

- ``size_bytes``: bytes of the file.
- ``parameters``: elements of every tensor.
- ``bits_per_weight``: over the tensors stored in a quantized type (any GGML type but F32,
  F16, BF16 and F64), their bytes in bits over their elements, block scales included; a file
  with no quantized tensor reports the width of its 2-D decoder matrices, as for safetensors.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from compressor.evaluation.size import SizeInfo

_FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}
_NOT_DECODER_MATRIX = ("token_embd", "output.weight")  # GGUF's names of the embeddings and lm_head


def measure_gguf(path: Path) -> SizeInfo:
    from gguf import GGUFReader

    tensors = GGUFReader(str(path)).tensors
    quantized = [t for t in tensors if t.tensor_type.name not in _FLOAT_TYPES]
    widths = quantized or [
        t for t in tensors if len(t.shape) == 2 and not any(name in t.name for name in _NOT_DECODER_MATRIX)
    ]
    represented = sum(int(t.n_elements) for t in widths)
    types = Counter(t.tensor_type.name for t in tensors)
    return SizeInfo(
        size_bytes=path.stat().st_size,
        bits_per_weight=8 * sum(int(t.n_bytes) for t in widths) / represented if represented else None,
        parameters=sum(int(t.n_elements) for t in tensors),
        compressed_layers=len(quantized),
        compressed_weights=sum(int(t.n_elements) for t in quantized),
        stored_as="gguf (" + ", ".join(name for name, _ in types.most_common()) + ")",
    )
