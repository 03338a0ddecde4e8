"""Numeric merge parameters that vary by layer or by tensor name, resolved like mergekit's.

A setting is one of:
- a number: the same everywhere;
- a list of numbers, a gradient: layer `i` of `N` sits at `t = i / (N - 1)` and takes the value
  linearly interpolated at `t` along the list (tensors outside the layers sit at t = 0);
- a list of ``{filter, value}``: the first entry whose `filter` is a substring of the tensor
  name (or is null / "*") gives the value, itself a number or a gradient; when none matches,
  the next less specific scope (the merge block's default, then the method default) decides.
"""

from __future__ import annotations

import re
from typing import Union

from pydantic import BaseModel, ConfigDict

LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


class FilteredValue(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    filter: str | None = None
    value: Union[float, list[float]]


Setting = Union[float, list[float], list[FilteredValue]]


def layer_position(tensor_name: str, num_layers: int) -> float:
    """mergekit's `t` of a tensor: its layer's place in [0, 1]; 0 outside the layers."""
    found = LAYER_INDEX.search(tensor_name)
    if found is None:
        return 0.0
    if num_layers <= 1:
        return 1.0
    return int(found.group(1)) / (num_layers - 1)


def _gradient(values: list[float], t: float) -> float:
    scaled = t * (len(values) - 1)
    low = int(scaled)
    high = min(len(values) - 1, low + 1)
    fraction = scaled - low
    return (1 - fraction) * values[low] + fraction * values[high]


def evaluate(setting: Setting | None, tensor_name: str, t: float) -> float | None:
    """The setting's value for this tensor, or None when a filter list has no match."""
    if setting is None:
        return None
    if isinstance(setting, (int, float)):
        return float(setting)
    if not setting:
        return None
    if all(isinstance(v, (int, float)) for v in setting):
        return _gradient([float(v) for v in setting], t)  # type: ignore[arg-type]
    for entry in setting:
        assert isinstance(entry, FilteredValue)
        if entry.filter in (None, "*") or entry.filter in tensor_name:
            return evaluate(entry.value, tensor_name, t)
    return None


def resolve(scopes: list[Setting | None], tensor_name: str, t: float, default: float | None) -> float | None:
    """First scope (most specific first) that yields a value, else `default`."""
    for setting in scopes:
        value = evaluate(setting, tensor_name, t)
        if value is not None:
            return value
    return default


def numbers_in(setting: Setting | None) -> list[float]:
    """Every number a setting can produce at a gradient's knots (for range checks)."""
    if setting is None:
        return []
    if isinstance(setting, (int, float)):
        return [float(setting)]
    out: list[float] = []
    for entry in setting:
        if isinstance(entry, FilteredValue):
            out.extend(numbers_in(entry.value))
        else:
            out.append(float(entry))
    return out
