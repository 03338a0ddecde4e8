"""Library log messages that tell our users nothing, dropped at the logger that emits them.

Only the named messages are dropped; everything else those loggers say still shows.
"""

from __future__ import annotations

import logging
import warnings

# logger name → starts of the messages to drop
NOISE: dict[str, tuple[str, ...]] = {
    # bitsandbytes ≥ 0.50 on CPUs with AVX-512 BF16, at import: its optional Hub kernel for the
    # packed NF4 inference layout needs the `kernels` package. Fine-tuning keeps the trainable
    # layout (finetune.keep_nf4_trainable_layout), so that kernel would never run anyway.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    # DeepSpeed (imported by peft/accelerate when installed) on a machine without CUDA, as a
    # WARNING: fine-tuning does not use DeepSpeed, and torch's own device check is what counts.
    "DeepSpeed": ("Setting accelerator to CPU",),
}


# Python warnings that a library raises about another library's calls: (category, message regex).
WARNING_NOISE: tuple[tuple[type[Warning], str], ...] = (
    # transformers 5 renamed gradient checkpointing to activation checkpointing; peft's
    # prepare_model_for_kbit_training and get_peft_model still call the old names.
    (FutureWarning, r"`(gradient_checkpointing_enable|is_gradient_checkpointing)` is deprecated"),
)


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
    for category, pattern in WARNING_NOISE:
        warnings.filterwarnings("ignore", message=pattern, category=category)
