"""`compress eval` outside a git checkout: lm-eval's git-hash lookup no longer prints git's
`fatal: not a git repository` on stderr, and the hash lm-eval records is what it was."""

from __future__ import annotations

import json
import subprocess

from compressor.cli import main

EVAL = ["--tasks", "perplexity", "--limit", "2", "--no-cache", "-q"]


def _git(folder, *args: str) -> str:
    command = ["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()


def test_outside_a_git_checkout_git_says_nothing_and_no_hash_is_recorded(tiny_llama, tmp_path, capfd, monkeypatch):
    folder = tmp_path / "not-a-checkout"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # git stops here, wherever tmp_path lies
    assert subprocess.run(["git", "describe", "--always"], capture_output=True).returncode != 0
    capfd.readouterr()
    assert main(["eval", f"m={tiny_llama}", *EVAL, "-o", str(tmp_path / "r")]) == 0
    err = capfd.readouterr().err  # file-descriptor level: what the git child process wrote too
    assert "not a git repository" not in err, err
    results = json.loads((tmp_path / "r" / "lm_eval_results" / "m.json").read_text())
    assert results["git_hash"] is None  # lm-eval's own fallback, as before


def test_inside_a_git_checkout_the_hash_is_still_recorded(tiny_llama, tmp_path, monkeypatch):
    folder = tmp_path / "checkout"
    folder.mkdir()
    _git(folder, "init", "-q")
    (folder / "a").write_text("a\n")
    _git(folder, "add", "a")
    _git(folder, "commit", "-qm", "a")
    monkeypatch.chdir(folder)
    assert main(["eval", f"m={tiny_llama}", *EVAL, "-o", str(tmp_path / "r")]) == 0
    results = json.loads((tmp_path / "r" / "lm_eval_results" / "m.json").read_text())
    assert results["git_hash"] == _git(folder, "describe", "--always")
