"""The built wheel holds every source file of the project.

CI and `make` install the project editable, which reads the source folders directly and so hides a
package missing from pyproject.toml's explicit list (compressor.training was: a `pip install .`
could not distill or fine-tune). This test builds the wheel as a user's install would and compares.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHIPPED_SUFFIXES = {".py", ".jsonl", ".yaml", ".c"}


def source_roots() -> dict[str, str]:
    """Source folder -> the import path it installs as, read from pyproject.toml."""
    setuptools_config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = {"compressor": "compressor"}
    for package, folder in setuptools_config["package-dir"].items():
        roots[folder] = package.replace(".", "/")
    return roots


def expected_wheel_files() -> set[str]:
    expected = set()
    for folder, installed_as in source_roots().items():
        for path in (REPO / folder).rglob("*"):
            if path.suffix in SHIPPED_SUFFIXES and "__pycache__" not in path.parts:
                expected.add(f"{installed_as}/{path.relative_to(REPO / folder).as_posix()}")
    return expected


def build_wheel(work: Path) -> Path:
    # Build from a copy: an in-tree build would leave build/ and egg-info folders in the checkout.
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in source_roots():
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"), str(source)],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = (work / "dist").glob("compressor-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_the_wheel_ships_every_source_file_and_nothing_else(wheel):
    expected = expected_wheel_files()
    assert "compressor/training/distill_loop.py" in expected  # the roots were read right
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name for name in archive.namelist() if ".dist-info/" not in name}
    assert sorted(expected - shipped) == []
    assert sorted(shipped - expected) == []


def test_the_wheel_declares_the_console_script(wheel):
    with zipfile.ZipFile(wheel) as archive:
        (entry_points,) = [n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")]
        text = archive.read(entry_points).decode()
    assert "compress = compressor.cli:main" in text
