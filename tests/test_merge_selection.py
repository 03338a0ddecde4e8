"""Streamed sparsification of task vectors: exact kept sets, chunk-independent results, bounded work memory."""

from __future__ import annotations

import pytest
import torch

from compressor.algorithms import delta_selection, merge_methods
from compressor.algorithms.delta_selection import RandomMask, largest, middle, row_slices, select_rank
from compressor.algorithms.merge_methods import TensorMerge, merge_method_registry
from compressor.algorithms.sparsify import keep_largest_sorted, keep_middle_sorted


def tied_delta(shape, dtype, seed=0) -> torch.Tensor:
    """Deltas like a bf16 fine-tune's: few distinct magnitudes, so the cut falls inside a tie."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(-6, 7, shape, generator=generator).to(torch.float64) / 64).to(dtype)


def reference_window(delta: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Keep descending magnitude ranks [lo, hi), equal magnitudes lower index first (stable sort)."""
    order = torch.sort(delta.abs().reshape(-1).double(), descending=True, stable=True).indices
    keep = torch.zeros(delta.numel(), dtype=torch.bool)
    keep[order[lo:hi]] = True
    return delta * keep.reshape(delta.shape)


def run_chunked(selector, delta: torch.Tensor, rows_per_chunk: int) -> torch.Tensor:
    slices = [slice(s, s + rows_per_chunk) for s in range(0, delta.shape[0], rows_per_chunk)]
    selector.prepare(lambda: (delta[rows] for rows in slices))
    return torch.cat([selector.select(i, delta[rows]) for i, rows in enumerate(slices)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_radix_selection_finds_the_exact_rank(dtype):
    delta = torch.randn(300, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    magnitudes = torch.sort(delta.abs().reshape(-1).double(), descending=True).values
    for rank in (0, 1, 57, 1049, delta.numel() - 1):
        bits, above = select_rank(lambda: iter(delta.split(37)), dtype, rank)
        value = torch.tensor([bits], dtype=torch.int64).to(delta_selection._INT_VIEWS[delta.element_size()]).view(dtype)
        assert value.double().item() == magnitudes[rank].item()
        assert above == int((magnitudes > magnitudes[rank]).sum())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows_per_chunk", [1, 13, 500])
def test_ties_trim_keeps_exactly_the_top_share_in_any_chunking(dtype, rows_per_chunk):
    delta = tied_delta((120, 9), dtype)
    k = int(0.37 * delta.numel())
    kept = run_chunked(largest(delta.numel(), 0.37, rescale=False), delta, rows_per_chunk)
    assert int((kept != 0).sum()) == k  # no zeros in tied_delta's kept set: every cut entry is nonzero
    torch.testing.assert_close(kept, reference_window(delta, 0, k), rtol=0, atol=0)


@pytest.mark.parametrize("rows_per_chunk", [1, 7, 500])
def test_breadcrumbs_window_in_any_chunking(rows_per_chunk):
    delta = tied_delta((80, 11), torch.bfloat16, seed=3)
    n = delta.numel()
    keep, outliers = int(0.6 * n), int(0.1 * n)
    smallest = n - keep - outliers
    kept = run_chunked(middle(n, 0.6, rescale=False, gamma=0.1), delta, rows_per_chunk)
    torch.testing.assert_close(kept, reference_window(delta, n - smallest - keep, n - smallest), rtol=0, atol=0)


def test_rescaled_magnitude_keeps_the_l1_norm():
    delta = tied_delta((64, 33), torch.float64, seed=2)
    k = int(0.25 * delta.numel())
    kept = run_chunked(largest(delta.numel(), 0.25, rescale=True), delta, 5)
    torch.testing.assert_close(kept.abs().sum(), delta.abs().sum(), rtol=1e-12, atol=0)
    trimmed = reference_window(delta, 0, k)
    torch.testing.assert_close(kept, trimmed * (delta.abs().sum() / trimmed.abs().sum()), rtol=1e-12, atol=0)


def test_dare_chunks_replay_their_masks_and_keep_the_l1_norm():
    delta = torch.randn(300, 40, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    first = run_chunked(RandomMask(0.3, True, torch.Generator().manual_seed(7)), delta, 17)
    again = run_chunked(RandomMask(0.3, True, torch.Generator().manual_seed(7)), delta, 17)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert abs((first != 0).double().mean().item() - 0.3) < 0.01
    torch.testing.assert_close(first.abs().sum(), delta.abs().sum(), rtol=1e-12, atol=0)
    nonzero = first != 0
    ratio = first[nonzero] / delta[nonzero]
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()))  # one scale for the whole tensor


@pytest.mark.parametrize("rescale", [True, False])
def test_dare_mask_does_not_depend_on_the_slice_size(rescale, monkeypatch):
    # Small mask blocks, so slices of 1, 7 or 300 rows start and end inside blocks.
    monkeypatch.setattr(delta_selection, "MASK_BLOCK_ELEMENTS", 64)
    delta = torch.randn(300, 40, generator=torch.Generator().manual_seed(4), dtype=torch.float32)
    results = [run_chunked(RandomMask(0.4, rescale, torch.Generator().manual_seed(9)), delta, rows) for rows in (1, 7, 300)]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=0, atol=0)
    assert abs((results[0] != 0).double().mean().item() - 0.4) < 0.02
    different_seed = run_chunked(RandomMask(0.4, rescale, torch.Generator().manual_seed(10)), delta, 7)
    assert not torch.equal(different_seed != 0, results[0] != 0)


def test_dare_inputs_sharing_a_generator_get_different_masks():
    delta = torch.ones(100, 50)
    generator = torch.Generator().manual_seed(3)
    first = run_chunked(RandomMask(0.5, False, generator), delta, 9)
    second = run_chunked(RandomMask(0.5, False, generator), delta, 9)
    assert not torch.equal(first, second)


def merge_call(method: str, tensors, **options) -> torch.Tensor:
    n = len(tensors)
    spec = merge_method_registry().get(method)
    call = TensorMerge(
        tensors=tuple(tensors), base_index=n - 1, weight=(*([0.6, 0.5, 0.3][: n - 1]), None),
        density=(*([0.5, 0.7, 0.4][: n - 1]), 1.0), gamma=(0.02,) * n,
        normalize=options.pop("normalize", spec.default_normalize), rescale=spec.default_rescale, **options,
    )
    return spec.function(call)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "dare_ties", "dare_linear", "task_arithmetic"])
def test_task_vector_methods_give_the_same_tensor_in_any_chunking(method, monkeypatch):
    base = tied_delta((200, 24), torch.bfloat16, seed=1) * 4
    models = [base + tied_delta((200, 24), torch.bfloat16, seed=s) for s in (5, 6)]
    generator = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    monkeypatch.setattr(merge_methods, "CHUNK_ELEMENTS", 24 * 7)  # 29 row slices
    sliced = merge_call(method, [*models, base], generator=generator())
    assert len(row_slices(base.shape, merge_methods.CHUNK_ELEMENTS)) == 29
    monkeypatch.setattr(merge_methods, "CHUNK_ELEMENTS", None)
    whole = merge_call(method, [*models, base], generator=generator())
    # DARE too: each input's masks are drawn in flat order from recorded generator states.
    torch.testing.assert_close(sliced, whole, rtol=0, atol=0)


def test_sort_tie_break_uses_argsort_order_like_mergekit():
    base = tied_delta((64, 10), torch.bfloat16, seed=1)
    models = [base + tied_delta((64, 10), torch.bfloat16, seed=s) for s in (2, 3)]
    out = merge_call("ties", [*models, base], tie_break="sort", normalize=False)
    w = torch.tensor([0.6, 0.5], dtype=torch.bfloat16)  # weights in the tensors' dtype, as the method has them
    deltas = [keep_largest_sorted(m - base, d, rescale=False) * w[i] for i, (m, d) in enumerate(zip(models, (0.5, 0.7)))]
    stacked = torch.stack(deltas)
    majority = (stacked.sum(dim=0) >= 0).to(stacked.dtype) * 2 - 1
    expected = base + (stacked * (stacked.sign() == majority)).sum(dim=0)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    crumbs = merge_call("breadcrumbs", [*models, base], tie_break="sort")
    stacked = torch.stack([keep_middle_sorted(m - base, d, rescale=False, gamma=0.02) * w[i]
                           for i, (m, d) in enumerate(zip(models, (0.5, 0.7)))])
    expected = base + stacked.sum(dim=0)
    torch.testing.assert_close(crumbs, expected, rtol=0, atol=0)


PEAK_SCRIPT = """
import sys, torch
from compressor.algorithms import merge_methods
from tests.test_merge_selection import merge_call, tied_delta
merge_methods.CHUNK_ELEMENTS = 1 << 16
shape = (4096, 1024)
base = tied_delta(shape, torch.bfloat16, seed=1) * 4
models = [base + tied_delta(shape, torch.bfloat16, seed=s) for s in (2, 3)]
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
before = rss("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # restart the high-water mark here
merge_call(sys.argv[2], [*models, base], tie_break=sys.argv[1], generator=torch.Generator().manual_seed(0))
print(rss("VmHWM:") - before)
"""


@pytest.mark.parametrize(
    "method, tie_break", [("ties", "index"), ("ties", "sort"), ("dare_ties", "index"), ("dare_linear", "index")]
)
def test_streamed_memory_is_the_output_plus_a_few_slices(method, tie_break):
    """Peak resident memory of one ties / DARE call on a 4M-entry bf16 tensor (inputs already
    held): streamed, about the output; the sort-based order, ~20 bytes per entry more."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, tie_break, method], capture_output=True, text=True,
                            cwd=root, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    peak = int(result.stdout.split()[-1])
    tensor_bytes = 4096 * 1024 * 2
    if tie_break == "index":
        assert peak < 2 * tensor_bytes
    else:
        assert peak > 6 * tensor_bytes


def test_recipe_tie_break_reaches_the_merge_and_its_record(tiny_tokenizer_dir, tmp_path):
    """bf16 inputs (ties at the cut): `sort` and `index` differ only in which equal magnitudes they keep."""
    import json

    from safetensors.torch import load_file

    from compressor.cli import main
    from tests.merge_fixtures import perturbed_copy, recipe_text
    from tests.tiny_models import build_tiny_checkpoint

    base = build_tiny_checkpoint(tmp_path / "base", "llama", tiny_tokenizer_dir, dtype=torch.bfloat16)
    ft = perturbed_copy(base, tmp_path / "ft", seed=1, scale=0.01)
    outputs = {}
    for tie_break in ("index", "sort"):
        block = f"method: ties\nbase: {base}\nmodels:\n  - {{model: {ft}, weight: 1.0, density: 0.5}}\ntie_break: {tie_break}"
        (tmp_path / f"{tie_break}.yaml").write_text(recipe_text(block))
        assert main(["--recipe", str(tmp_path / f"{tie_break}.yaml"), "-o", str(tmp_path / tie_break), "-q"]) == 0
        record = json.loads((tmp_path / tie_break / "compression.json").read_text())
        assert record["merge"]["tie_break"] == tie_break
        outputs[tie_break] = load_file(str(tmp_path / tie_break / "model.safetensors"))
    reference, model = load_file(str(base / "model.safetensors")), load_file(str(ft / "model.safetensors"))
    name = "model.embed_tokens.weight"
    delta = (model[name] - reference[name]).abs().reshape(-1)
    keep = int(0.5 * delta.numel())
    threshold = torch.sort(delta.float(), descending=True).values[keep - 1]
    differ = (outputs["index"][name] != outputs["sort"][name]).reshape(-1)
    assert differ.any()  # the orders do differ on bf16 ties...
    assert bool((delta[differ].float() == threshold).all())  # ...but only among entries at the cut
    assert threshold > 0
    for out in outputs.values():  # and both keep exactly `keep` (nonzero) deltas: base + delta differs from base
        assert int((out[name] != reference[name]).sum()) == keep
