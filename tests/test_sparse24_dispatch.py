"""SparseLinear's dispatch: 2:4 weights go to torch's semi-structured kernels on CUDA, all else to
the reference path (the CUDA run itself is checked on a GPU by benchmarks/gpu_kernels.py --sparse24)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from compressor.kernels.sparse24_backend import Semi24CudaBackend
from compressor.kernels.sparse_linear import SparseLinear


def two_of_four_weight(rows: int = 64, columns: int = 128, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator)
    grouped = weight.reshape(rows, -1, 4)
    smallest = grouped.abs().argsort(-1)[..., :2]  # drop the two smallest of every 4
    return grouped.scatter(-1, smallest, 0.0).reshape(rows, columns)


def cuda_like(dtype=torch.bfloat16, requires_grad=False):
    """What the backend reads of an input, as a CUDA tensor would show it."""
    return SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype, requires_grad=requires_grad)


def test_on_cpu_the_reference_path_runs_and_says_why():
    weight = two_of_four_weight()
    layer = SparseLinear.from_dense(weight.to(torch.bfloat16), torch.randn(64).to(torch.bfloat16))
    x = torch.randn(3, 128).to(torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
    assert torch.equal(out, torch.nn.functional.linear(x, layer.dense_weight(), layer.bias))
    assert layer.kernel_report == {"kernel": "reference", "skipped": {"cuda-sparse24": "needs a CUDA device"}}


def test_the_two_of_four_check_follows_the_buffers():
    layer = SparseLinear.from_dense(two_of_four_weight())
    assert layer.two_of_four()
    dense = SparseLinear.from_dense(torch.randn(64, 128))  # nothing pruned
    assert not dense.two_of_four()
    unstructured = two_of_four_weight()
    unstructured[0, 2] = 1.0  # a third weight kept in the first group of row 0
    changed = SparseLinear.from_dense(unstructured)
    assert not changed.two_of_four()
    layer.weight_bitmask.copy_(changed.weight_bitmask)  # written in place: checked again
    assert not layer.two_of_four()


def test_the_backend_names_each_reason_a_cuda_input_is_refused():
    backend = Semi24CudaBackend()
    layer = SparseLinear.from_dense(two_of_four_weight().to(torch.bfloat16))
    assert backend.unsupported(layer, cuda_like(torch.float32)) == "takes fp16/bf16 activations, not torch.float32"
    assert "needs a gradient" in backend.unsupported(layer, cuda_like(requires_grad=True))
    odd = SparseLinear.from_dense(two_of_four_weight(48, 128))
    assert backend.unsupported(odd, cuda_like()) == "needs out x in a multiple of 32 x 64; layer is 48 x 128"
    dense = SparseLinear.from_dense(torch.randn(64, 128))
    assert backend.unsupported(dense, cuda_like()) == "weight is not 2:4 (some group of 4 columns keeps more than 2)"
