"""Shared fixtures: tiny random models built from a config, with a small real tokenizer.

No test reaches the network: the Hub is switched off before anything imports it.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.tiny_models import build_tiny_checkpoint, train_tiny_tokenizer  # noqa: E402


ALL_THREADS = torch.get_num_threads()


def pytest_configure(config):
    from tests.xdist_units import worker_threads

    threads = worker_threads(ALL_THREADS)
    if threads is not None:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the subprocesses tests start


@pytest.fixture(autouse=True)
def _all_cores_where_needed(request):
    """Every core for the files that test the native kernels' threaded path (tests/xdist_units.py)."""
    from tests.xdist_units import ALL_CORES_FILES

    threads = torch.get_num_threads()
    if request.node.path.name in ALL_CORES_FILES and threads != ALL_THREADS:
        torch.set_num_threads(ALL_THREADS)
        yield
        torch.set_num_threads(threads)
    else:
        yield


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` (what `make test` runs) with the units of tests/xdist_units.py."""
    if config.getvalue("dist") != "loadfile":
        return None
    from tests.xdist_units import make_scheduler

    return make_scheduler(config, log)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Calibration batches, GGUF conversions and native kernels go to a per-session folder (one per
    xdist worker); the tests that share the user's cache across runs remove the variable."""
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    yield


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    train_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama", tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_qwen2_moe(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """Read-only: tests that change a checkpoint copy it first."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen2-moe"), "qwen2_moe", tiny_tokenizer_dir)


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    yield


CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def chat_llama(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    """A tiny model with a chat template on its tokenizer. Qwen3 (hidden 64): bitsandbytes'
    CPU inference path repacks NF4 weights in blocks of 64 input columns and fails on the
    96-wide tiny Llama (SmolLM2's 576 and 1536 are multiples of 64)."""
    from transformers import AutoTokenizer

    folder = build_tiny_checkpoint(tmp_path_factory.mktemp("chat-qwen3"), "qwen3", tiny_tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(folder))
    return folder
