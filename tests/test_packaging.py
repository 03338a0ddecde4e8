"""The built wheel holds every source file of the project.

CI and `make` install the project editable, which reads the source folders directly and so hides a
package missing from pyproject.toml's explicit list (compressor.training was: a `pip install .`
could not distill or fine-tune). This test builds the wheel as a user's install would and compares;
it also builds the sdist and a wheel from it, and checks that every third-party import is declared.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from compressor.extras import OPTIONAL_MODULES

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


TOP_LEVEL_FILES = ("pyproject.toml", "README.md", "MANIFEST.in", "CHANGELOG.md", "Makefile")


def copy_source(work: Path) -> Path:
    # Build from a copy: an in-tree build would leave build/ and egg-info folders in the checkout.
    source = work / "source"
    source.mkdir()
    for name in TOP_LEVEL_FILES:
        shutil.copy(REPO / name, source / name)
    for folder in (*source_roots(), "tests"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return source


def build_wheel(source: Path, dist: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(source)],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = dist.glob("compressor-*.whl")
    return wheel


def build_sdist(source: Path, dist: Path) -> Path:
    """What `python -m build --sdist --no-isolation` runs: setuptools' PEP 517 hook, in the source folder."""
    subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(dist)!r})"],
        cwd=source, check=True, capture_output=True, text=True,
    )
    (sdist,) = dist.glob("compressor-*.tar.gz")
    return sdist


def wheel_files(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return {name for name in archive.namelist() if ".dist-info/" not in name}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return copy_source(tmp_path_factory.mktemp("source"))


@pytest.fixture(scope="module")
def wheel(source, tmp_path_factory) -> Path:
    return build_wheel(source, tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def sdist(source, tmp_path_factory) -> Path:
    return build_sdist(source, tmp_path_factory.mktemp("sdist"))


def test_the_wheel_ships_every_source_file_and_nothing_else(wheel):
    expected = expected_wheel_files()
    assert "compressor/training/distill_loop.py" in expected  # the roots were read right
    shipped = wheel_files(wheel)
    assert sorted(expected - shipped) == []
    assert sorted(shipped - expected) == []


def test_the_wheel_declares_the_console_script(wheel):
    with zipfile.ZipFile(wheel) as archive:
        (entry_points,) = [n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")]
        text = archive.read(entry_points).decode()
    assert "compress = compressor.cli:main" in text


def test_a_wheel_built_from_the_sdist_equals_the_wheel_built_from_the_tree(sdist, wheel, tmp_path):
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path / "unpacked", filter="data")
    (unpacked,) = (tmp_path / "unpacked").iterdir()
    assert sorted(wheel_files(build_wheel(unpacked, tmp_path / "dist"))) == sorted(wheel_files(wheel))


def test_the_sdist_ships_the_whole_test_suite(sdist):
    """setuptools alone ships only tests/test_*.py, not the conftest and fixtures they import."""
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    tests = {f"tests/{p.name}" for p in (REPO / "tests").glob("*.py")}
    assert sorted(tests - names) == []
    assert {"tests/conftest.py", "tests/tiny_models.py", "MANIFEST.in", "CHANGELOG.md"} <= names
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in names)


def _requirement_name(requirement: str) -> str:
    return canonical(re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0))


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_top_level_modules() -> dict[str, str]:
    """Every module the shipped code imports (absolute imports' first part) -> a file that imports it."""
    found: dict[str, str] = {}
    for folder in source_roots():
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], str(path.relative_to(REPO)))
    return found


def test_every_third_party_import_is_a_declared_dependency_or_extra():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {_requirement_name(r) for r in project["dependencies"]}
    extras = {name: {_requirement_name(r) for r in reqs} for name, reqs in project["optional-dependencies"].items()}
    distributions = packages_distributions()
    third_party = {
        module: where for module, where in imported_top_level_modules().items()
        if module not in sys.stdlib_module_names and module != "compressor"
    }
    assert {"torch", "transformers", "jinja2", "tokenizers", "lm_eval", "triton"} <= set(third_party)  # the scan works
    undeclared = []
    for module, where in sorted(third_party.items()):
        names = {canonical(d) for d in distributions.get(module, [module])}
        optional = OPTIONAL_MODULES.get(module)
        if names & core:
            assert optional is None, f"{module} is a core dependency, not optional"
        elif optional is None or canonical(optional.package) not in names & extras[optional.name]:
            undeclared.append(f"{module} (imported in {where})")
    assert undeclared == []


def test_each_optional_module_names_its_extra_as_pyproject_declares_it():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    declared = {name: {_requirement_name(r) for r in reqs} for name, reqs in extras.items()}
    for module, extra in OPTIONAL_MODULES.items():
        assert canonical(extra.package) in declared[extra.name], (module, extra)
        assert canonical(extra.package) in declared["all"] and canonical(extra.package) in declared["test"], module
    assert {extra.name for extra in OPTIONAL_MODULES.values()} == set(declared) - {"all", "test"}
