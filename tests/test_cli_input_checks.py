"""Bad flags and paths on every subcommand: one line on stderr naming the thing, exit 2, nothing written.

Everything here is refused before a model is loaded, so the model arguments may be dummies.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from compressor.cli import main
from tests.cli_runs import assert_one_line_refusal, run_cli


_run = run_cli
_assert_refused = assert_one_line_refusal


def _assert_nothing_written(folder: Path, before: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == before, "a refused run must write nothing"


# The argument lists of each subcommand that takes --device, up to (not including) --device.
DEVICE_COMMANDS = {
    "compress": ["MODEL", "--recipe", "RECIPE", "-o", "OUT"],
    "merge": ["merge", "RECIPE", "-o", "OUT"],
    "eval": ["eval", "a=MODEL", "--tasks", "perplexity", "-o", "OUT"],
    "generate": ["generate", "MODEL", "hello"],
    "bench": ["bench", "MODEL"],
}


def _fill(argv: list[str], tmp_path: Path) -> list[str]:
    names = {"MODEL": str(tmp_path / "model"), "RECIPE": str(tmp_path / "r.yaml"), "OUT": str(tmp_path / "out")}
    return [names.get(a, a.replace("MODEL", names["MODEL"])) for a in argv]


@pytest.mark.parametrize("command", DEVICE_COMMANDS)
@pytest.mark.parametrize(
    "device, fragment",
    [("bogus", "unknown device 'bogus'"), ("meta", "unsupported device 'meta'"),
     ("cuda", "'cuda': CUDA is not available"), ("cuda:1", "'cuda:1': CUDA is not available"),
     ("xpu", "'xpu': XPU is not available"), ("xpu:0", "'xpu:0': XPU is not available")],
)
def test_every_device_flag_is_checked(command, device, fragment, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only machine, wherever the test runs
    if hasattr(torch, "xpu"):
        monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    code, err = _run(_fill(DEVICE_COMMANDS[command], tmp_path) + ["--device", device], capsys)
    _assert_refused(code, err, "--device", fragment)
    _assert_nothing_written(tmp_path, set())


def test_xpu_is_refused_where_torch_has_none(tmp_path, capsys, monkeypatch):
    if hasattr(torch, "xpu"):
        monkeypatch.setattr(torch.xpu, "is_available", lambda: False)  # an XPU-less machine, wherever the test runs
    code, err = _run(_fill(DEVICE_COMMANDS["compress"], tmp_path) + ["--device", "xpu"], capsys)
    _assert_refused(code, err, "--device", "'xpu': XPU is not available on this machine")


def test_cuda_index_beyond_the_devices_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    code, err = _run(_fill(DEVICE_COMMANDS["generate"], tmp_path) + ["--device", "cuda:2"], capsys)
    _assert_refused(code, err, "--device", "'cuda:2': this machine has 2 CUDA devices")


RECIPE = "name: t\ncalibration: {samples: 4, seq_len: 32}\nstages:\n  - quantize: {method: rtn, weights: {bits: 4, group_size: 32}}\n"
MERGEKIT = "merge_method: linear\nmodels:\n  - model: MODEL\n    parameters: {weight: 0.5}\n  - model: MODEL\n    parameters: {weight: 0.5}\n"

# Each command that writes OUT, with OUT last; models may be dummies: OUT is checked before any is read.
OUTPUT_COMMANDS = {
    "compress": ["MODEL", "--recipe", "RECIPE", "-q", "-o"],
    "compress-dry-run": ["MODEL", "--recipe", "RECIPE", "--dry-run", "-o"],
    "merge": ["merge", "MERGEKIT", "-q", "-o"],
    "eval": ["eval", "a=MODEL", "--tasks", "perplexity", "-q", "-o"],
    "finetune": ["finetune", "MODEL", "--dataset", "DATA", "-o"],
}


def _output_argv(command: str, tmp_path: Path, out: Path) -> list[str]:
    (tmp_path / "r.yaml").write_text(RECIPE)
    (tmp_path / "mk.yaml").write_text(MERGEKIT.replace("MODEL", str(tmp_path / "model")))
    (tmp_path / "d.jsonl").write_text('{"text": "hello"}\n')
    names = {"MODEL": tmp_path / "model", "RECIPE": tmp_path / "r.yaml", "MERGEKIT": tmp_path / "mk.yaml", "DATA": tmp_path / "d.jsonl"}
    return [str(names.get(a, a)).replace("a=MODEL", f"a={tmp_path / 'model'}") for a in OUTPUT_COMMANDS[command]] + [str(out)]


@pytest.mark.parametrize("command", OUTPUT_COMMANDS)
@pytest.mark.parametrize("below", ["sub", "sub/deeper"])
def test_output_below_a_file_is_refused_before_any_work(command, below, tmp_path, capsys):
    (tmp_path / "afile").write_text("keep me")
    out = tmp_path / "afile" / below
    argv = _output_argv(command, tmp_path, out)
    before = {p.name for p in tmp_path.iterdir()}
    code, err = _run(argv, capsys)
    _assert_refused(code, err, str(out), f"{tmp_path / 'afile'} is not a folder")
    _assert_nothing_written(tmp_path, before)
    assert (tmp_path / "afile").read_text() == "keep me"


@pytest.mark.parametrize("command", OUTPUT_COMMANDS)
def test_output_in_a_folder_we_cannot_write_is_refused(command, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # Tests may run as root, which os.access never refuses: pretend `locked` is read-only.
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != locked and real_access(path, mode, **kw))
    out = locked / "new" / "out"
    argv = _output_argv(command, tmp_path, out)
    before = {p.name for p in tmp_path.iterdir()}
    code, err = _run(argv, capsys)
    _assert_refused(code, err, str(out), f"{locked} is not writable")
    _assert_nothing_written(tmp_path, before)
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("command", [*OUTPUT_COMMANDS, "densify"])
@pytest.mark.parametrize("out_is", ["the model", "its parent"])
def test_output_that_would_delete_an_input_is_refused(command, out_is, tiny_llama, tmp_path, capsys):
    # OUT is replaced as a whole, so with --overwrite it would delete the model being read.
    import shutil

    model = shutil.copytree(tiny_llama, tmp_path / "model")
    out = model if out_is == "the model" else tmp_path
    argv = ["densify", str(model), str(out)] if command == "densify" else _output_argv(command, tmp_path, out)
    if command == "merge":  # two distinct models; the first is the one OUT would delete
        other = shutil.copytree(tiny_llama, tmp_path / "other")
        (tmp_path / "mk.yaml").write_text(MERGEKIT.replace("MODEL", str(model), 1).replace("MODEL", str(other)))
    files = {p.name: p.read_bytes() for p in model.iterdir()}
    before = {p.name for p in tmp_path.iterdir()}
    code, err = _run(argv + ["--overwrite"], capsys)
    _assert_refused(code, err, "pick another output folder")
    _assert_nothing_written(tmp_path, before)
    assert {p.name: p.read_bytes() for p in model.iterdir()} == files


# --- compress finetune ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--seed", "-1"], "--seed: expected an integer from 0 to 2**32 - 1, got '-1'"),
        (["--seed", str(2**32)], f"--seed: expected an integer from 0 to 2**32 - 1, got '{2**32}'"),
        (["--lr", "inf"], "--lr: expected a finite positive number, got 'inf'"),
        (["--lr", "nan"], "--lr: expected a finite positive number, got 'nan'"),
        (["--alpha", "inf"], "--alpha: expected a finite positive number, got 'inf'"),
        (["--log-every", "-3"], "--log-every: expected an integer ≥ 0, got '-3'"),
        (["--eval-every", "-1"], "--eval-every: expected an integer ≥ 0, got '-1'"),
        (["--epochs", "0"], "--epochs: expected a positive integer, got '0'"),
        (["--epochs", "2", "--steps", "3"], "argument --steps: not allowed with argument --epochs"),
        (["--rank", "0"], "argument --r/--rank: expected a positive integer, got '0'"),
    ],
)
def test_bad_finetune_numbers_are_refused_by_the_parser(flags, fragment, tmp_path, capsys):
    argv = ["finetune", tmp_path / "model", "--dataset", tmp_path / "d.jsonl", "-o", tmp_path / "out", *flags]
    code, err = _run(argv, capsys)
    _assert_refused(code, err, fragment)
    _assert_nothing_written(tmp_path, set())


@pytest.mark.parametrize("flag", ["--log-every", "--eval-every"])
def test_zero_still_means_never_for_the_reporting_intervals(flag):
    from compressor.commands.finetune import _parser

    args = _parser().parse_args(["m", "--dataset", "d.jsonl", "-o", "o", flag, "0"])
    assert getattr(args, flag[2:].replace("-", "_")) == 0


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("[1, 2, 3]", "d.json: record 0 is not a JSON object (it is int)"),
        ('[{"text": "a"}, "b"]', "d.json: record 1 is not a JSON object (it is str)"),
        ('[{"text": "a"},\n {"text": ]', "d.json:2: not valid JSON"),
    ],
)
def test_json_dataset_records_must_be_objects(content, fragment, tiny_llama, tmp_path, capsys):
    data = tmp_path / "d.json"
    data.write_text(content)
    out = tmp_path / "out"
    code, err = _run(["finetune", tiny_llama, "--dataset", data, "-o", out, "--steps", "1"], capsys)
    _assert_refused(code, err, fragment)
    assert not out.exists()


def test_dataset_that_is_not_text(tiny_llama, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b"\xff\xfe\x00binary")
    code, err = _run(["finetune", tiny_llama, "--dataset", data, "-o", tmp_path / "out", "--steps", "1"], capsys)
    _assert_refused(code, err, f"{data}: not UTF-8 text")


@pytest.fixture
def no_progress_bars():
    """transformers' weight-loading bar also goes to stderr; these tests look at the error line."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    yield
    hf_logging.enable_progress_bar()


@pytest.mark.parametrize(
    "targets, fragment",
    [
        ("nosuch_proj", "--targets: no module of the model is named nosuch_proj (its Linear layers: down_proj, gate_proj"),
        ("q_proj,nosuch", "--targets: no module of the model is named nosuch ("),
        ("layers", "--targets: LoRA cannot go on layers (ModuleList): name Linear layers (down_proj"),
        (" , ", "--targets: expected all-linear or module names, got ' , '"),
    ],
)
def test_lora_targets_the_model_lacks(targets, fragment, tiny_llama, tmp_path, capsys, no_progress_bars):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello world, an example to train on."}\n')
    out = tmp_path / "out"
    code, err = _run(["finetune", tiny_llama, "--dataset", data, "-o", out, "--steps", "1", "--targets", targets], capsys)
    _assert_refused(code, err, fragment)
    assert not out.exists()


@pytest.fixture
def progress_bars_restored():
    """`-q` turns transformers' progress bars off for the process; turn them back on after."""
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    yield
    hf_logging.enable_progress_bar()


def test_finetune_quiet_leaves_only_the_error_line(tiny_llama, tmp_path, capsys, progress_bars_restored):
    """Without -q, transformers' weight-loading bar reaches stderr before the error (see below)."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello world, an example to train on."}\n')
    argv = ["finetune", tiny_llama, "--dataset", data, "--steps", "1", "--targets", "nosuch_proj"]
    code, err = _run([*argv, "-o", tmp_path / "loud"], capsys)
    assert code == 2 and "Loading weights" in err  # what -q is for
    code, err = _run([*argv, "-o", tmp_path / "quiet", "-q"], capsys)
    _assert_refused(code, err, "--targets: no module of the model is named nosuch_proj")
    assert not (tmp_path / "loud").exists() and not (tmp_path / "quiet").exists()


def test_the_bitsandbytes_kernels_notice_is_dropped_and_nothing_else():
    import logging

    import compressor.commands.finetune  # noqa: F401  installs the filter

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    record = logger.makeRecord(logger.name, logging.WARNING, __file__, 1,
                               "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...",
                               ("No module named 'kernels'",), None)
    assert logger.filter(record) is False
    other = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, "some other problem", (), None)
    assert logger.filter(other) is True
    deepspeed = logging.getLogger("DeepSpeed")
    notice = deepspeed.makeRecord(deepspeed.name, logging.WARNING, __file__, 1, "Setting accelerator to CPU. If you"
                                  " have GPU or other accelerator, we were unable to detect it.", (), None)
    assert deepspeed.filter(notice) is False


def test_peft_calls_to_renamed_transformers_methods_are_not_shown():
    import warnings

    from compressor.commands.library_notices import drop_library_noise

    with warnings.catch_warnings(record=True) as caught:
        drop_library_noise()
        warnings.warn("`gradient_checkpointing_enable` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("`something_else` is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["`something_else` is deprecated"]


def test_finetune_prints_only_its_error(tiny_llama, tmp_path):
    """In a fresh process bitsandbytes is imported by the command itself: its import-time
    notice (on CPUs with AVX-512 BF16) must not come before the one error line."""
    import subprocess
    import sys

    data = tmp_path / "list.json"
    data.write_text("[1, 2, 3]")
    result = subprocess.run(
        [sys.executable, "-m", "compressor.cli", "finetune", str(tiny_llama), "--dataset", str(data),
         "-o", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "kernels-community" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {data}: record 0 is not a JSON object (it is int)"]


# --- compress generate, push, and unknown commands ---------------------------------------------

def test_generate_refuses_an_empty_prompt(tmp_path, capsys):
    code, err = _run(["generate", tmp_path / "model", ""], capsys)
    _assert_refused(code, err, "compress generate: argument prompt: the prompt is empty")


@pytest.mark.parametrize("argv", [["frobnicate"], ["frobnicate", "-o", "OUT"], ["gpt2", "-q"]])
def test_unknown_command_is_named(argv, tmp_path, capsys):
    code, err = _run(_fill(argv, tmp_path), capsys)
    word = argv[0]
    _assert_refused(code, err, f"compress: unknown command '{word}' (commands: bench, densify, eval, finetune, generate,",
                    f"or, to compress a model '{word}', give --recipe/-r")
    _assert_nothing_written(tmp_path, set())


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["frobnicate", "--recipe", "RECIPE", "-o", "OUT"], "frobnicate: not a local path and not a Hub id"),
        (["frobnicate", "-qr", "RECIPE", "-o", "OUT"], "frobnicate: not a local path and not a Hub id"),
        (["frobnicate", "--rec=RECIPE", "-o", "OUT"], "frobnicate: not a local path and not a Hub id"),
        (["frobnicate", "-r"], "argument --recipe/-r: expected one argument"),
        (["org/model", "-o", "OUT"], "the following arguments are required: --recipe/-r"),
        (["MODEL", "-o", "OUT"], "the following arguments are required: --recipe/-r"),
        (["builtin:nope", "-o", "OUT"], "the following arguments are required: --recipe/-r"),
        ([], "the following arguments are required: --recipe/-r"),
    ],
)
def test_what_could_be_a_model_still_goes_to_compress(argv, fragment, tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "r.yaml").write_text(RECIPE)
    argv = [a.replace("RECIPE", str(tmp_path / "r.yaml")) for a in _fill(argv, tmp_path)]
    code, err = _run(argv, capsys)
    _assert_refused(code, err, fragment)
    assert "unknown command" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "revision, why",
    [
        ("bad..rev~^:", "it contains one of: space ~ ^ : ? * [ \\"),
        ("two..dots", "it contains '..'"),
        ("a b", "it contains one of: space"),
        ("tab\there", "it contains a control character"),
        ("--force", "it starts with '-'"),
        ("branch/", "it starts or ends with '/'"),
        ("a//b", "contains '//'"),
        ("main.lock", "ends with '.lock'"),
        ("x/.hidden", "starts with '.'"),
        ("v1.", "it ends with '.'"),
        ("dev@{1}", "'@{'"),
        ("", "it is empty"),
    ],
)
def test_push_refuses_a_revision_git_would_refuse(revision, why, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    code, err = _run(["push", tmp_path / "out", "me/model", "--dry-run", f"--revision={revision}"], capsys)
    _assert_refused(code, err, "--revision", f"{revision!r} is not a valid branch name: ", why)
    _assert_nothing_written(tmp_path, {"out"})
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("revision", ["main", "dev", "feature/new-quant", "refs/pr/1", "v1.0", "w4a16_2025-01"])
def test_ordinary_branch_names_pass(revision):
    from compressor.hub_ids import revision_problem

    assert revision_problem(revision) is None


def test_help_after_an_unknown_word_is_compress_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate", "--help"])
    assert exit_info.value.code == 0
    assert "usage: compress" in capsys.readouterr().out


@pytest.mark.parametrize("command", OUTPUT_COMMANDS)
def test_output_where_no_folder_can_be_made_is_refused_before_any_work(command, tmp_path, capsys):
    # /proc accepts no new folder, even from root (for whom os.access always says yes): the
    # old check let the run compress, then fail with a traceback when it first wrote.
    out = Path("/proc") / "compressor-out" / "out"
    code, err = _run(_output_argv(command, tmp_path, out), capsys)
    _assert_refused(code, err, str(out), "/proc refuses new folders")
