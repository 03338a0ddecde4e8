"""One writer per OUT: a run that writes OUT holds `flock` on `.OUT.lock`; a second run to the
same OUT is refused at once (one line, exit 2, nothing written); the lock goes with its process.

The other writer here is a separate process that takes the lock as any `compress` run does
(flock on `.OUT.lock`, its pid inside), so these tests need no second model run.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from compressor.resume import StageCheckpoints
from tests.cli_runs import assert_one_line_refusal, run_cli
from tests.test_cli_input_checks import OUTPUT_COMMANDS, _output_argv

RTN = "name: t\ncalibration: {samples: 4, seq_len: 32}\nstages:\n" \
      "  - quantize: {method: rtn, weights: {bits: 4, group_size: 32}, targets: ['re:.*mlp.*']}\n" \
      "  - quantize: {method: rtn, weights: {bits: 8, group_size: null}, targets: ['re:.*self_attn.*']}\n"

_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()} {sys.argv[2]}".encode())
print("held", flush=True)
sys.stdin.read()
"""


def lock_file(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


@contextmanager
def another_writer(out: Path, activity: str = "writing") -> Iterator[subprocess.Popen]:
    """A process holding OUT's lock until the block ends, recording `activity` as compress does."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(lock_file(out)), activity], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait(timeout=30)
        lock_file(out).unlink(missing_ok=True)  # what the holder, killed, could not remove


def lockable(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@pytest.mark.parametrize("command", [*(c for c in OUTPUT_COMMANDS if c != "compress-dry-run"), "densify"])
def test_a_second_writer_of_one_out_is_refused_at_once(command, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["densify", str(tmp_path / "model"), str(out)] if command == "densify" else _output_argv(command, tmp_path, out)
    (tmp_path / "model").mkdir()  # densify checks its source exists before OUT; the others read it later
    with another_writer(out) as holder:
        before = {p.name for p in tmp_path.iterdir()}
        code, err = run_cli(argv, capsys)
        assert_one_line_refusal(code, err, str(out), f"another compress run (pid {holder.pid}) is writing this output folder")
        assert {p.name for p in tmp_path.iterdir()} == before, "a refused run must write nothing"
        assert not lockable(lock_file(out)), "the refused run took the lock from its holder"


def test_dry_run_takes_no_lock(tiny_llama, tmp_path, capsys):
    (tmp_path / "r.yaml").write_text(RTN)
    out = tmp_path / "out"
    with another_writer(out):
        code, err = run_cli([tiny_llama, "--recipe", tmp_path / "r.yaml", "-o", out, "--dry-run"], capsys)
    assert code == 0, err


def test_lock_is_released_on_interrupt_and_on_error(tiny_llama, tmp_path, capsys, monkeypatch):
    (tmp_path / "r.yaml").write_text(RTN)
    out = tmp_path / "runs" / "out"
    original = StageCheckpoints.save
    seen = {}

    def save_then_interrupt(self, index, *args, **kwargs):
        seen["locked while running"] = not lockable(lock_file(out))
        original(self, index, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(StageCheckpoints, "save", save_then_interrupt)
    argv = [tiny_llama, "--recipe", tmp_path / "r.yaml", "-o", out, "-q", "--no-perplexity"]
    assert run_cli(argv, capsys)[0] == 130
    assert seen == {"locked while running": True}
    assert not lock_file(out).exists()  # released, and its file removed
    assert sorted(p.name for p in out.parent.iterdir()) == [".out.work"]  # the stages kept for --resume

    monkeypatch.setattr(StageCheckpoints, "save", original)
    (tmp_path / "r.yaml").write_text(RTN.replace("re:.*mlp.*", "re:nomatch"))  # refused once planned against the model
    code, err = run_cli(argv + ["--resume"], capsys)
    assert_one_line_refusal(code, err, "r.yaml:4")
    assert not lock_file(out).exists()
    (tmp_path / "r.yaml").write_text(RTN)
    assert run_cli(argv + ["--resume"], capsys)[0] == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_out_whose_parents_were_made_for_the_lock_is_cleaned_up(tmp_path, capsys):
    # A run refused after taking the lock (here: a model that does not exist) leaves no folder behind.
    (tmp_path / "r.yaml").write_text(RTN)
    code, err = run_cli([tmp_path / "nosuch-model", "--recipe", tmp_path / "r.yaml", "-o", tmp_path / "a" / "b" / "out"], capsys)
    assert code == 2, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_lock_file_left_by_a_killed_run_blocks_nothing(tiny_llama, tmp_path, capsys):
    (tmp_path / "r.yaml").write_text(RTN)
    out = tmp_path / "out"
    with another_writer(out) as holder:
        holder.send_signal(signal.SIGKILL)  # no cleanup runs: the file stays, the flock goes with the process
        holder.wait(timeout=30)
        assert lock_file(out).read_text() == f"{holder.pid} writing"
        code, err = run_cli([tiny_llama, "--recipe", tmp_path / "r.yaml", "-o", out, "-q", "--no-perplexity"], capsys)
        assert code == 0, err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yaml"]


def test_push_preview_has_one_writer_too(tiny_llama, tmp_path, capsys):
    # `compress push --dry-run` empties and refills OUT.push-preview: two at once would interleave.
    (tmp_path / "r.yaml").write_text(RTN)
    out = tmp_path / "out"
    assert run_cli([tiny_llama, "--recipe", tmp_path / "r.yaml", "-o", out, "-q", "--no-perplexity"], capsys)[0] == 0
    preview = tmp_path / "out.push-preview"
    with another_writer(preview) as holder:
        code, err = run_cli(["push", out, "org/name", "--dry-run"], capsys)
        assert_one_line_refusal(code, err, str(preview), f"another compress run (pid {holder.pid}) is writing")
        assert not preview.exists()
    code, err = run_cli(["push", out, "org/name", "--dry-run"], capsys)
    assert code == 0, err
    assert (preview / "model.safetensors").is_file() and not lock_file(preview).exists()


def test_a_push_holds_out_while_it_reads_it(tiny_llama, tmp_path, capsys, monkeypatch):
    # A `compress -o OUT --overwrite` replacing OUT during an upload would mix old and new files in one commit.
    from compressor import hub

    (tmp_path / "r.yaml").write_text(RTN)
    out = tmp_path / "out"
    assert run_cli([tiny_llama, "--recipe", tmp_path / "r.yaml", "-o", out, "-q", "--no-perplexity"], capsys)[0] == 0
    seen = {}

    def uploading(plan, token, **_):
        seen["lock"] = lock_file(out).read_text()
        seen["lockable"] = lockable(lock_file(out))
        code, err = run_cli([tiny_llama, "--recipe", tmp_path / "r.yaml", "-o", out, "--overwrite", "-q"], capsys)
        seen["writer"] = (code, err)
        return "http://hub/commit/1"

    monkeypatch.setattr(hub, "check_online", lambda: None)
    monkeypatch.setattr(hub, "push", uploading)
    code, err = run_cli(["push", out, "org/name", "--token", "t"], capsys)
    assert code == 0, err
    assert seen["lock"] == f"{os.getpid()} uploading" and not seen["lockable"]
    assert_one_line_refusal(*seen["writer"], str(out), f"another compress run (pid {os.getpid()}) is uploading this output folder")
    assert not lock_file(out).exists()


def test_a_push_is_refused_while_a_run_writes_out(tiny_llama, tmp_path, capsys, monkeypatch):
    from compressor import hub

    (tmp_path / "r.yaml").write_text(RTN)
    out = tmp_path / "out"
    assert run_cli([tiny_llama, "--recipe", tmp_path / "r.yaml", "-o", out, "-q", "--no-perplexity"], capsys)[0] == 0
    monkeypatch.setattr(hub, "check_online", lambda: None)
    monkeypatch.setattr(hub, "push", lambda *a, **k: pytest.fail("a refused push must upload nothing"))
    for extra in ([], ["--dry-run"]):
        with another_writer(out) as holder:
            code, err = run_cli(["push", out, "org/name", "--token", "t", *extra], capsys)
            assert_one_line_refusal(code, err, str(out), f"another compress run (pid {holder.pid}) is writing this output folder")
    assert not (tmp_path / "out.push-preview").exists()
