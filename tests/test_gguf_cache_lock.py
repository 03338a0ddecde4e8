"""Two runs that need the same GGUF conversion: the second waits for the first and reuses it.

Before, both converted, and the later one removed and replaced the cached folder while the first
was reading it (seen when two test workers converted SmolLM2 at once)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import transformers

from compressor import model_io

OTHER_RUN = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from compressor.cache import entry_lock

    target = Path(sys.argv[1])
    with entry_lock(target):
        print("converting", flush=True)
        time.sleep(1.5)
        staging = target.parent / "staging"
        staging.mkdir()
        (staging / "config.json").write_text("{}")
        os.replace(staging, target)
""")


def test_a_second_run_waits_for_the_conversion_in_progress_and_reuses_it(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")  # never read: the other run owns the conversion
    target = model_io._gguf_cache_dir(gguf)
    other = subprocess.Popen([sys.executable, "-c", OTHER_RUN, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "converting"
        assert not target.exists()

        def converted_twice(*args, **kwargs):
            raise AssertionError("the GGUF file was converted a second time")

        monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", converted_twice)
        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", converted_twice)
        assert model_io.convert_gguf(gguf) == target
        assert (target / "config.json").read_text() == "{}"
    finally:
        assert other.wait(timeout=60) == 0


def test_the_lock_is_free_again_after_a_failed_conversion(tmp_path, monkeypatch):
    """A conversion that fails lets go of the lock: the next run converts instead of waiting forever."""
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    target = model_io._gguf_cache_dir(gguf)
    calls = []

    def fails(*args, **kwargs):
        calls.append(args)
        raise OSError("unreadable")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fails)
    for _ in range(2):
        try:
            model_io.convert_gguf(gguf)
        except Exception as err:  # a ModelError (one line) or the OSError, by transformers' version
            assert "unreadable" in str(err)
    assert len(calls) == 2 and not target.exists()
    probe = subprocess.run(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR);"
         " fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); print('free')", str(target.parent / f".{target.name}.lock")],
        capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "free"
