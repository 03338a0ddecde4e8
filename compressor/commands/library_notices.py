"""Library log messages that tell our users nothing, dropped at the logger that emits them.

Only the named messages are dropped; everything else those loggers say still shows.
"""

from __future__ import annotations

import logging

# logger name → starts of the messages to drop
NOISE: dict[str, tuple[str, ...]] = {
    # bitsandbytes ≥ 0.50 on CPUs with AVX-512 BF16, at import: its optional Hub kernel for the
    # packed NF4 inference layout needs the `kernels` package. Fine-tuning keeps the trainable
    # layout (finetune.keep_nf4_trainable_layout), so that kernel would never run anyway.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
}


class DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def drop_library_noise() -> None:
    """Install the filters (idempotent); call before the libraries are imported."""
    for name, starts in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(starts))
