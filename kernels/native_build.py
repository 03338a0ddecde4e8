"""Build a kernel's C source (``kernels/csrc``) into a shared library once, and load it with ctypes.

Why C through ctypes and not a PyTorch C++ extension: the source needs no PyTorch headers, so a
plain C compiler builds it in about a second (a C++ extension takes a minute on first use), and a
ctypes call costs a few microseconds, small next to the matmuls it runs. The library is cached
under ``compressor.cache.cache_root()/native``, named by a hash of the source, the flags and the
compiler, and written through a temporary file and an atomic rename, so concurrent processes can
build it at once. Anything that stops a build (no compiler, a compiler error, a CPU without the
instructions) becomes a reason string: the caller's backend reports it and the next kernel runs.

``COMPRESSOR_NATIVE_KERNELS=0`` switches every native kernel off (the reason says so).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-std=c11")
SWITCH = "COMPRESSOR_NATIVE_KERNELS"


@dataclass(frozen=True)
class NativeLibrary:
    library: ctypes.CDLL | None
    reason: str | None  # why there is no library (None when there is one)


def native_disabled() -> str | None:
    if os.environ.get(SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"native kernels switched off ({SWITCH}=0)"
    return None


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _compiler_version(compiler: str) -> str:
    done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    return done.stdout.splitlines()[0] if done.stdout else compiler


def _build(source: Path, compiler: str) -> Path:
    from compressor.cache import cache_root

    text = source.read_bytes()
    key = hashlib.sha256(text + " ".join(FLAGS).encode() + _compiler_version(compiler).encode()).hexdigest()[:16]
    folder = cache_root() / "native"
    target = folder / f"{source.stem}-{key}.so"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, suffix=".so.tmp")
    os.close(handle)
    try:
        command = [compiler, *FLAGS, str(source), "-o", temporary]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(compiler).name} failed: {done.stderr.strip()[-400:]}")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target


def load_native(name: str) -> NativeLibrary:
    """``csrc/<name>.c`` built and loaded, or the reason it cannot be (the switch is read every call)."""
    off = native_disabled()
    return NativeLibrary(None, off) if off else build_native(name)


@functools.cache
def build_native(name: str) -> NativeLibrary:
    """``csrc/<name>.c`` built and loaded, or why not (cached for the process; ignores the switch)."""
    compiler = _compiler()
    if compiler is None:
        return NativeLibrary(None, "no C compiler (cc, gcc or clang; or $CC) to build the native kernel")
    try:
        path = _build(SOURCE_DIR / f"{name}.c", compiler)
        return NativeLibrary(ctypes.CDLL(str(path)), None)
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        return NativeLibrary(None, f"native kernel {name} did not build: {err}")


__all__ = ["NativeLibrary", "build_native", "load_native", "native_disabled", "SWITCH"]
