"""Releasing the resident pages of memory-mapped weights: only unmodified pages go, the values
read back the same, and the layer-by-layer engine gives back the dense weights it replaced."""

from __future__ import annotations

import mmap
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from compressor.algorithms.gptq import HessianAccumulator
from compressor.file_pages import release_file_pages
from compressor.input_statistics import InputStatisticsAlgorithm
from compressor.layerwise import run_layerwise

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/pagemap")
PAGE = mmap.PAGESIZE


def resident_pages(tensor: torch.Tensor) -> int:
    """How many pages wholly inside the tensor's storage are resident in this process."""
    storage = tensor.untyped_storage()
    first = -(-storage.data_ptr() // PAGE)
    last = (storage.data_ptr() + storage.nbytes()) // PAGE
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first * 8)
        entries = memoryview(pagemap.read((last - first) * 8)).cast("Q")
    return sum(1 for entry in entries if entry >> 63)


@pytest.fixture
def mapped(tmp_path):
    tensors = {"head": torch.randn(1001), "big": torch.randn(300_000), "tail": torch.randn(777)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    return tensors, load_file(str(tmp_path / "w.safetensors"))


def test_released_pages_leave_memory_and_read_back_the_same(mapped):
    original, loaded = mapped
    big = loaded["big"]
    assert float(big.sum()) == pytest.approx(float(original["big"].sum()), rel=1e-6)  # touch every page
    pages = resident_pages(big)
    assert pages >= 290  # 1.2 MB of float32

    released = release_file_pages([big])

    assert released == pages * PAGE
    assert resident_pages(big) == 0
    assert torch.equal(big, original["big"])  # re-read from the file


def test_a_page_written_to_keeps_its_write(mapped):
    original, loaded = mapped
    big = loaded["big"]
    big.sum()
    middle = 150_000
    big[middle] = 1234.5  # this page is now a private copy, not the file's bytes
    released = release_file_pages([big])
    assert 0 < released < big.numel() * 4
    assert resident_pages(big) == 1
    assert float(big[middle]) == 1234.5
    expected = original["big"].clone()
    expected[middle] = 1234.5
    assert torch.equal(big, expected)


def test_pages_shared_with_neighbours_and_anonymous_tensors_are_left_alone(mapped):
    original, loaded = mapped
    for tensor in loaded.values():
        tensor.sum()
    head = loaded["head"]  # 4004 bytes: no page lies wholly inside it
    assert release_file_pages([head]) == 0
    assert torch.equal(head, original["head"])
    anonymous = torch.randn(500_000)
    copy = anonymous.clone()
    assert release_file_pages([anonymous]) == 0
    assert torch.equal(anonymous, copy)


def test_the_engine_gives_back_the_dense_weights_it_replaced(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.bfloat16).eval()
    targets = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    dense = {n: m.weight for n, m in targets.items()}
    saved = load_file(str(tiny_llama / "model.safetensors"))
    tokens = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=tokens)  # every weight resident, as after the base perplexity
    assert sum(resident_pages(w) for w in dense.values()) > 0

    def replace(names, statistic):  # stands in for a quantizer: new weights, old ones dropped
        for name in names:
            parent, _, child = name.rpartition(".")
            old = targets[name]
            new = nn.Linear(old.in_features, old.out_features, bias=False, dtype=old.weight.dtype)
            new.weight.data.copy_(old.weight.data)
            setattr(model.get_submodule(parent), child, new)

    algorithm = InputStatisticsAlgorithm(targets, lambda n, d: HessianAccumulator(n, d), replace)
    run_layerwise(model, tokens, algorithm, batch_size=2, show_progress=False)

    assert sum(resident_pages(w) for w in dense.values()) == 0
    for name, weight in dense.items():  # the old tensors still read the checkpoint's values
        assert torch.equal(weight, saved[name + ".weight"])
    kept = model.model.embed_tokens.weight
    assert resident_pages(kept) > 0  # weights still in use are not touched by the engine
