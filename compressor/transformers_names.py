"""transformers APIs that were renamed within the versions we support, called by the installed name.

transformers 5.24 renamed the KV cache argument and output field `past_key_values` to `cache`, and
activation checkpointing replaced the `gradient_checkpointing_*` methods. The old names still work
on 5.24 but print FutureWarnings on every call, which our users would read as our fault; versions
down to pyproject's floor (5.21) know only the old cache name. So the name is picked from the model.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

OLD_CACHE_NAME = "past_key_values"
NEW_CACHE_NAME = "cache"
CACHE_NAMES = (OLD_CACHE_NAME, NEW_CACHE_NAME)


def cache_argument(model: nn.Module) -> str:
    """The keyword under which the model's forward takes the KV cache."""
    parameters = inspect.signature(model.forward).parameters
    return NEW_CACHE_NAME if NEW_CACHE_NAME in parameters else OLD_CACHE_NAME


def returned_cache(output: Any) -> Any:
    """The KV cache a forward returned (`output.cache` on 5.24+, `output.past_key_values` before)."""
    keys = output.keys() if hasattr(output, "keys") else ()
    return output[NEW_CACHE_NAME] if NEW_CACHE_NAME in keys else getattr(output, OLD_CACHE_NAME)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward, non-reentrant (so frozen inputs still pass gradients through)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def disable_activation_checkpointing(model: nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
