"""The optional parts of compressor (pyproject.toml's extras), and the one line that says how to get one.

`pip install compressor` brings only the core: a feature that needs a module of an extra asks
`missing_extra` when it is planned (a recipe parsed, a command's flags checked), before any model is
read, so a run without the extra stops with one line naming the install command instead of an
ImportError traceback halfway through.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from compressor.errors import UserError


@dataclass(frozen=True)
class Extra:
    name: str  # the extra in pyproject.toml: pip install 'compressor[name]'
    package: str  # the distribution it brings that provides the module


# Import name -> the extra that installs it (tests/test_packaging.py checks these against pyproject.toml).
OPTIONAL_MODULES: dict[str, Extra] = {
    "datasets": Extra("data", "datasets"),
    "pyarrow": Extra("data", "pyarrow"),
    "lm_eval": Extra("eval", "lm-eval"),
    "bitsandbytes": Extra("nf4", "bitsandbytes"),
    "triton": Extra("gpu", "triton"),
    "deepspeed": Extra("gpu", "deepspeed"),
}


def is_installed(module: str) -> bool:
    """Whether `module` can be imported, found without importing it (lm-eval and datasets are slow to import)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module whose spec is unset, or one whose lookup itself fails
        return False


def install_hint(module: str) -> str:
    return f"pip install 'compressor[{OPTIONAL_MODULES[module].name}]'"


def missing_extra(module: str, feature: str) -> str | None:
    """None when `module` is installed; else one line saying that `feature` needs it and how to install it."""
    if is_installed(module):
        return None
    return f"{feature} needs {OPTIONAL_MODULES[module].package}, which is not installed: {install_hint(module)}"


def require_extra(module: str, feature: str, where: str | None = None, error: type[UserError] = UserError) -> None:
    """Raise `error` (a UserError: one line, exit 2) when `module` is not installed."""
    problem = missing_extra(module, feature)
    if problem is not None:
        raise error(problem, where=where)
