"""GPU kernel benchmark (needs CUDA): Triton W4A16 / W8A16 against torch bf16 matmul.

    .venv/bin/python benchmarks/gpu_kernels.py [--bits 4] [--group 128] [--dtype bfloat16]
    .venv/bin/python benchmarks/gpu_kernels.py --sparse24
    .venv/bin/python benchmarks/gpu_kernels.py --sweep [--bits 4] [--group 128]

`--sparse24` times a 2:4-pruned SparseLinear (torch.sparse.to_sparse_semi_structured, chosen by
SparseLinear's dispatch) against the same dense weight in bf16 instead.

Shapes (in x out) 4096x14336 and 4096x4096, batch 1/16/64/128; `triton.testing.do_bench`
(median, L2 cache flushed between runs by do_bench's cache clearing). Each configuration is
first checked against the float64 reference (relative error <= 1e-2), then timed. Prints the
speed-up over bf16 and the weight bytes each kernel streams per second (packed codes and
scales for ours, the bf16 matrix for torch; activations and outputs left out).

`--sweep` times the decode kernel (triton_gemv) at batch 1 with each of its configs fixed,
beside the autotuner's pick, and at batch 4 and 8 against the 16-row tensor-core tile kernel,
whose own configs it then times at 16 rows.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.kernel_fixtures
from tests.kernel_fixtures import float64_reference, relative_error  # noqa: E402


def random_layer(n: int, k: int, bits: int, group: int | None, dtype: torch.dtype):
    """A QuantLinear [n, k] of random codes and scales on the GPU, and its dequantized weight."""
    from compressor.kernels.quant_linear import QuantLinear

    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.randint(qmin, qmax + 1, (n, k), dtype=torch.int8, device="cuda")
    scale = torch.rand(n, 1 if group is None else k // group, device="cuda") * 0.01 + 0.001
    layer = QuantLinear.from_codes(codes, scale, None, bits=bits, group_size=group, bias=None, dtype=dtype)
    return layer, layer.dequantized_weight(dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8))
    parser.add_argument("--group", type=int, default=128, help="group size; 0 for per-channel")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--sparse24", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="time each decode-kernel config")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark runs on a GPU")
    if args.sparse24:
        return sparse24(getattr(torch, args.dtype))
    if args.sweep:
        return sweep(args.bits, args.group or None, getattr(torch, args.dtype))

    import triton.testing

    from compressor.kernels.triton_ops import wxa16_linear
    from compressor.kernels.triton_parts import split_k_counters

    dtype = getattr(torch, args.dtype)
    group = args.group or None
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"{time.strftime('%Y-%m-%d', time.gmtime())} | W{args.bits} {'g' + str(group) if group else 'per-channel'} {args.dtype}")
    print(f"{'in x out':>12} {'batch':>5} {'bf16 ms':>9} {'wxa16 ms':>9} {'speed-up':>8} {'bf16 GB/s':>9} {'ours GB/s':>9} {'rel.err':>8}")
    for k, n in ((4096, 14336), (4096, 4096)):
        layer, dense = random_layer(n, k, args.bits, group, dtype)
        counters = split_k_counters(n, torch.device("cuda"))  # as QuantLinear's prepared state has
        for m in (1, 16, 64, 128):
            x = torch.randn(m, k, dtype=dtype, device="cuda")
            out = wxa16_linear(x, layer.weight_packed, layer.weight_scale, None, args.bits, group or k, counters)
            error = relative_error(out, float64_reference(layer, x))
            assert error <= 1e-2, f"{k}x{n} batch {m}: relative error {error}"
            bf16_ms = triton.testing.do_bench(lambda: torch.nn.functional.linear(x, dense), return_mode="median")
            ours_ms = triton.testing.do_bench(
                lambda: wxa16_linear(x, layer.weight_packed, layer.weight_scale, None, args.bits, group or k, counters),
                return_mode="median",
            )
            print(f"{k:>5}x{n:<6} {m:>5} {bf16_ms:9.4f} {ours_ms:9.4f} {bf16_ms / ours_ms:7.2f}x "
                  f"{dense_bytes(dense) / bf16_ms / 1e6:9.0f} {weight_bytes(layer) / ours_ms / 1e6:9.0f} {error:8.1e}")


def dense_bytes(weight: torch.Tensor) -> int:
    return weight.numel() * weight.element_size()


def weight_bytes(layer) -> int:
    tensors = [layer.weight_packed, layer.weight_scale] + ([layer.weight_zero_point] if layer.weight_zero_point is not None else [])
    return sum(dense_bytes(t) for t in tensors)


def sweep(bits: int, group: int | None, dtype: torch.dtype) -> None:
    import triton.testing

    from compressor.kernels import triton_gemv, triton_wxa16
    from compressor.kernels.triton_ops import wxa16_linear
    from compressor.kernels.triton_parts import split_k_counters

    print(f"{torch.cuda.get_device_name()} | triton {triton.__version__} | {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC | "
          f"decode kernel sweep W{bits} {'g' + str(group) if group else 'per-channel'} {dtype}")
    for k, n in ((4096, 14336), (4096, 4096)):
        layer, dense = random_layer(n, k, bits, group, dtype)
        args = (layer.weight_packed, layer.weight_scale, None, bits, group or k)
        counters = split_k_counters(n, torch.device("cuda"))
        bf16_ms = {}
        for m in (1, 4, 8):
            x = torch.randn(m, k, dtype=dtype, device="cuda")
            out = torch.empty(m, n, dtype=dtype, device="cuda")
            bf16_ms[m] = triton.testing.do_bench(lambda: torch.nn.functional.linear(x, dense), return_mode="median")
            rows = [("autotuned", None)]
            if m == 1:  # every config at one row; the autotuner's pick only at more
                rows += [(f"BLOCK_N {c.kwargs['BLOCK_N']:>3} split {c.kwargs['SPLIT_K']} prefetch {int(c.kwargs['PREFETCH'])} "
                          f"warps {c.num_warps} stages {c.num_stages}", dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages))
                         for c in triton_gemv._configs()]
            for label, config in rows:
                call = lambda: triton_gemv.wxa16_gemv(x, *args, out, counters=counters, config=config)  # noqa: E731
                call()
                error = relative_error(out, float64_reference(layer, x))
                ms = triton.testing.do_bench(call, return_mode="median")
                print(f"{k:>5}x{n:<6} M={m} {label:<55} {ms:8.4f} ms {bf16_ms[m] / ms:6.2f}x bf16 "
                      f"{weight_bytes(layer) / ms / 1e6:6.0f} GB/s  err {error:.1e}")
            print(f"  autotuner picked: {triton_gemv._gemv.best_config}")
            # the tensor-core tile kernel, which takes these rows padded to its 16-row tile
            padded = torch.randn(16, k, dtype=dtype, device="cuda")
            tile_ms = triton.testing.do_bench(lambda: wxa16_linear(padded, *args), return_mode="median")
            print(f"{k:>5}x{n:<6} M={m} {'16-row tensor-core tile kernel (M=16)':<55} {tile_ms:8.4f} ms {bf16_ms[m] / tile_ms:6.2f}x bf16")
        # the 16-row tile kernel's own configs at 16 rows (split-K as the wrapper picks it)
        x = torch.randn(16, k, dtype=dtype, device="cuda")
        dense16_ms = triton.testing.do_bench(lambda: torch.nn.functional.linear(x, dense), return_mode="median")
        for c in triton_wxa16._split_k_configs():
            config = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
            call = lambda: triton_wxa16.wxa16_matmul(x, *args, config=config)  # noqa: E731
            error = relative_error(call(), float64_reference(layer, x))
            ms = triton.testing.do_bench(call, return_mode="median")
            print(f"{k:>5}x{n:<6} M=16 tile {str(config):<60} {ms:8.4f} ms {dense16_ms / ms:6.2f}x bf16  err {error:.1e}")


def sparse24(dtype: torch.dtype) -> None:
    """SparseLinear against dense, plus the two semi-structured kinds PyTorch offers, each called
    with F.linear directly: cuSPARSELt (what to_sparse_semi_structured picks where it is built
    in; PyTorch builds its matmul plan on every call, pytorch/pytorch#179642) and CUTLASS."""
    import triton.testing
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    from compressor.kernels.sparse_linear import SparseLinear

    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC | 2:4 {dtype}")
    print(f"{'in x out':>12} {'batch':>5} {'dense ms':>9} {'ours ms':>9} {'speed-up':>8} {'cslt ms':>9} {'cutlass ms':>10} {'rel.err':>8}  kernel")
    for k, n in ((4096, 14336), (4096, 4096)):
        weight = torch.randn(n, k, device="cuda")
        grouped = weight.reshape(n, -1, 4)
        weight = grouped.scatter(-1, grouped.abs().argsort(-1)[..., :2], 0.0).reshape(n, k).to(dtype)
        layer = SparseLinear.from_dense(weight)
        kinds = {"cslt": SparseSemiStructuredTensorCUSPARSELT, "cutlass": SparseSemiStructuredTensorCUTLASS}
        semi = {}
        for name, kind in kinds.items():
            try:
                semi[name] = kind.from_dense(weight)
            except (RuntimeError, NotImplementedError) as error:  # a kind this build lacks
                print(f"  {name}: {str(error).splitlines()[0]}")
        for m in (1, 16, 64, 128):
            x = torch.randn(m, k, dtype=dtype, device="cuda")
            with torch.no_grad():
                out = layer(x)
            expected = x.double() @ weight.double().t()
            error = relative_error(out, expected)
            assert error <= 1e-2, f"{k}x{n} batch {m}: relative error {error}"
            dense_ms = triton.testing.do_bench(lambda: torch.nn.functional.linear(x, weight), return_mode="median")
            with torch.no_grad():
                sparse_ms = triton.testing.do_bench(lambda: layer(x), return_mode="median")
            kind_ms = {}
            for name, w in semi.items():
                kind_error = relative_error(torch.nn.functional.linear(x, w), expected)
                assert kind_error <= 1e-2, f"{name} {k}x{n} batch {m}: relative error {kind_error}"
                kind_ms[name] = triton.testing.do_bench(lambda: torch.nn.functional.linear(x, w), return_mode="median")
            print(f"{k:>5}x{n:<6} {m:>5} {dense_ms:9.4f} {sparse_ms:9.4f} {dense_ms / sparse_ms:7.2f}x "
                  f"{kind_ms.get('cslt', float('nan')):9.4f} {kind_ms.get('cutlass', float('nan')):10.4f} {error:8.1e}  "
                  f"{layer.kernel_report['kernel']}")


if __name__ == "__main__":
    main()
