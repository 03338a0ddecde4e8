"""Run the `compress` command in-process: check a refusal (exit 2, one `error:` line), or compress a fixture."""

from __future__ import annotations

from pathlib import Path

from compressor.cli import main


def run_cli(argv: list, capsys) -> tuple[int, str]:
    """(exit code, stderr stripped) of `compress *argv`; argparse's own refusals included."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse errors leave through SystemExit
        code = int(exit_.code or 0)
    return code, capsys.readouterr().err.strip()


def assert_one_line_refusal(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"


def compress_into(source: Path, recipe_text: str, folder: Path) -> Path:
    """`compress SOURCE` with the recipe written to FOLDER/r.yaml, into FOLDER/out (quiet, no
    held-out perplexity); asserts that it succeeded and returns OUT."""
    (folder / "r.yaml").write_text(recipe_text)
    out = folder / "out"
    assert main([str(source), "--recipe", str(folder / "r.yaml"), "-o", str(out), "-q", "--no-perplexity"]) == 0
    return out
