"""Runs the Triton interpreter cases (tests/triton_interpret_cases.py) in a fresh process.

TRITON_INTERPRET must be set before triton is first imported, which a shared pytest process
cannot promise; a child process with the variable in its environment can.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("triton_interpret_cases.py")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest", "-rs", str(CASES)],
        cwd=CASES.parent.parent, env=env, capture_output=True, text=True, timeout=600,
    )
    report = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    assert "skipped" not in result.stdout.splitlines()[-1], report
    assert " passed" in result.stdout.splitlines()[-1], report
