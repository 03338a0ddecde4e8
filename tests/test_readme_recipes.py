"""Every ```yaml recipe block of README.md dry-runs on a tiny model, so the examples cannot rot.

Blocks are fragments (a stage list, one stage, an `output:` block); each is completed the same way a
reader would: a `name`, a small calibration block (the tiny models hold 256 positions), and `stages:`
around bare stages. Keys the README writes are kept; only what cannot exist here is substituted, and
each substitution says why.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from compressor.cli import main
from compressor.recipe import builtin_recipes
from tests.cli_runs import run_cli
from tests.tiny_models import build_tiny_checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"
SMALL_CALIBRATION = "calibration: {samples: 8, seq_len: 64}\n"


def readme_yaml_blocks() -> list[tuple[int, str]]:
    """(first line number, text) of each ```yaml fence; an unclosed fence fails the collection."""
    lines = README.read_text().splitlines()
    blocks, index = [], 0
    while index < len(lines):
        if lines[index].startswith("```yaml"):
            end = index + 1
            while not lines[end].startswith("```"):
                end += 1  # IndexError: an unclosed fence
            blocks.append((index + 2, "\n".join(lines[index + 1 : end]) + "\n"))
            index = end
        index += 1
    return blocks


def test_readme_code_fences_are_balanced():
    """An unpaired fence (a merge once dropped one) turns the rest of the README inside out."""
    fences = [line for line in README.read_text().splitlines() if line.startswith("```")]
    assert len(fences) % 2 == 0


def complete_recipe(text: str, line: int, models: dict[str, Path]) -> str:
    """The block as a whole recipe for a tiny model (see the module docstring)."""
    text = re.sub(r"seq_len: \d+", "seq_len: 64", text)
    text = re.sub(r"samples: \d+", "samples: 8", text)
    first = next(row for row in text.splitlines() if row.strip() and not row.lstrip().startswith("#"))
    if first.startswith("- "):  # one bare stage
        text = "stages:\n" + "".join(f"  {row}\n" for row in text.splitlines())
    elif first.startswith("  - "):  # a stage list without its key
        text = "stages:\n" + text
    elif first.startswith("output:"):  # the push block alone: give it a stage to push the result of
        text = "stages: [{quantize: {method: rtn}}]\n" + text
    for hub_id, local in models.items():  # Hub ids cannot be reached offline
        text = text.replace(hub_id, str(local))
    if not re.search(r"^name:", text, re.M):
        text = f"name: readme-line-{line}\n" + text
    if not re.search(r"^calibration:", text, re.M):
        text += SMALL_CALIBRATION
    return text


@pytest.mark.parametrize("line,block", readme_yaml_blocks(), ids=lambda value: str(value) if isinstance(value, int) else "")
def test_readme_yaml_block_dry_runs_on_a_tiny_model(line, block, tiny_llama, tmp_path, capsys):
    # The merge example names Hub models (org/...) and a LoRA folder: the tiny model stands for every
    # input (copies, since a base listed again under `models` is refused) and the `+./code-lora` adapter
    # is dropped (no adapter exists here; merge's LoRA inputs are covered by tests/test_merge_pipeline.py).
    # Every other key of the block is kept.
    models = {"org/base-model": tiny_llama}
    if "- merge:" in block:
        for name in ("math-tune", "code-tune"):
            shutil.copytree(tiny_llama, tmp_path / name)
        models |= {"org/code-tune+./code-lora": tmp_path / "code-tune", "org/math-tune": tmp_path / "math-tune"}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(complete_recipe(block, line, models))
    merges = "- merge:" in block
    argv = ([] if merges else [tiny_llama]) + ["--recipe", recipe, "--dry-run", "-q"]
    code, err = run_cli(argv, capsys)
    assert code == 0, f"README.md:{line}: {err}\n{recipe.read_text()}"
    assert not any(tmp_path.glob("out*"))


def builtin_for_tiny_model(path: Path) -> str:
    """A built-in recipe with the calibration windows a tiny model holds; every other key kept."""
    text = re.sub(r"seq_len: \d+", "seq_len: 64", re.sub(r"samples: \d+", "samples: 8", path.read_text()))
    return text if re.search(r"^calibration:", text, re.M) else text + SMALL_CALIBRATION


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_builtin_recipe_dry_runs_on_a_tiny_model(name, tiny_llama, tiny_tokenizer_dir, tmp_path, capsys):
    # nf4 skips layers whose input width is not a multiple of 64 (bitsandbytes' blocks): the tiny Llama's
    # 96 and 160 leave it nothing, so it runs on the tiny Qwen3 (widths 64 and 128).
    model = build_tiny_checkpoint(tmp_path / "qwen3", "qwen3", tiny_tokenizer_dir) if name == "nf4" else tiny_llama
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(builtin_for_tiny_model(builtin_recipes()[name]))
    code, err = run_cli([model, "--recipe", recipe, "--dry-run", "-q"], capsys)
    assert code == 0, f"{name}: {err}"


SUBCOMMANDS = ("eval", "push", "finetune", "merge", "generate", "bench", "densify", "recipes")


def readme_command_flags() -> dict[str, set[str]]:
    """`--flags` of each `compress ...` line in README's code blocks (a line ending in `\\` continues)."""
    flags: dict[str, set[str]] = {}
    command = None
    for raw in README.read_text().splitlines():
        line = raw.strip()
        if line.startswith("compress "):
            words = line.split()
            command = words[1] if words[1] in SUBCOMMANDS else "compress"
        elif command is None:
            continue
        code = line.split("  #")[0]
        flags.setdefault(command, set()).update(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", code))
        if not code.rstrip().endswith("\\"):
            command = None
    return flags


@pytest.mark.parametrize("command,flags", sorted(readme_command_flags().items()))
def test_readme_command_lines_use_flags_the_command_has(command, flags, capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse prints the help and leaves
        main(([] if command == "compress" else [command]) + ["--help"])
    assert exit_.value.code == 0
    usage = capsys.readouterr().out
    known = set(re.findall(r"--[a-z][a-z0-9-]*", usage))
    assert flags <= known, f"compress {command}: {sorted(flags - known)} not in --help"


def test_readme_command_lines_are_found():
    """The scan above sees the flags README shows (a finetune synopsis continues over `\\` lines)."""
    flags = readme_command_flags()
    assert {"--dry-run", "--resume"} <= flags["compress"]
    assert {"--qlora", "--recompress", "--log-every"} <= flags["finetune"]
    assert {"--compile", "--repeats"} <= flags["bench"]


@pytest.mark.parametrize("command", ("compress",) + SUBCOMMANDS)
def test_every_flag_of_a_command_is_in_the_readme(command, capsys):
    """The other direction: a flag `--help` lists is documented somewhere in README.md."""
    with pytest.raises(SystemExit):
        main(([] if command == "compress" else [command]) + ["--help"])
    known = set(re.findall(r"--[a-z][a-z0-9-]*", capsys.readouterr().out))
    documented = set(re.findall(r"--[a-z][a-z0-9-]*", README.read_text()))
    long_forms = {"--help", "--output", "--quiet"}  # README writes -h, -o, -q
    assert known - long_forms <= documented, f"compress {command}: {sorted(known - long_forms - documented)}"
