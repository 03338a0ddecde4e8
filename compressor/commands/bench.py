"""`compress bench OUT`: decode tokens/s of the compressed model against its dense bf16 twin.

Both run in this process, interleaved. The dense twin is the same checkpoint with every
compressed layer (quantized, W8A8/FP8, sparse, NF4, factorized) turned into a plain Linear
(what plain transformers builds when it decompresses the checkpoint), so the comparison
isolates the kernels. Also prints which kernel each layer used and why faster kernels were
skipped. A checkpoint without compressed layers has no twin to compare with and is refused.
"""

from __future__ import annotations

from collections import defaultdict

from compressor.commands.args import Parser, device_name, positive_int, quiet_transformers
from compressor.errors import ModelError


def _print_kernels(model) -> None:
    from compressor.runtime import kernel_summary

    summary = kernel_summary(model, rows=1)  # what decode runs, whatever the prompt's prefill took
    by_kernel: dict[str, list[str]] = defaultdict(list)
    reasons: dict[str, set[str]] = defaultdict(set)
    for name, report in summary.items():
        by_kernel[report["kernel"]].append(name)
        for backend, reason in report["skipped"].items():
            reasons[backend].add(reason)
    print("kernels used at batch 1:")
    for kernel, names in sorted(by_kernel.items()):
        print(f"  {kernel:<20} {len(names):>4} layers  e.g. {names[0]}")
    for backend, why in sorted(reasons.items()):
        for reason in sorted(why):
            print(f"  skipped {backend}: {reason}")
    print("per layer:")
    for name, report in summary.items():
        print(f"  {name:<48} {report['kernel']}")


def run(argv: list[str]) -> int:
    parser = Parser(prog="compress bench", description="Decode speed of a compressed checkpoint vs its dense bf16 twin.")
    parser.add_argument("model", help="compressed checkpoint folder")
    parser.add_argument("--tokens", type=positive_int, default=32, help="decode steps to time (default 32)")
    parser.add_argument("--prompt-tokens", type=positive_int, default=16, help="prompt length before decoding (default 16)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs per model; the median counts (default 3)")
    parser.add_argument("--device", type=device_name, default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    parser.add_argument("--compile", action="store_true",
                        help="time both models' one-token forward under torch.compile with a static KV cache")
    args = parser.parse_args(argv)

    import torch

    import compressor
    from compressor.decode_speed import dense_weight_functions, densified, time_decode

    quiet_transformers()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    compressed = compressor.load(args.model, device=device, dtype=torch.bfloat16)
    compressed_classes = tuple(dense_weight_functions())
    if not any(isinstance(module, compressed_classes) for module in compressed.modules()):
        raise ModelError("no compressed layers to time against a dense twin (a plain checkpoint, or one pruned "
                         "structurally); `compress generate` runs it", where=args.model)
    dense = densified(compressed)
    vocab = compressed.config.vocab_size
    prompt = torch.randint(3, vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0)).to(device)
    timings = time_decode({"compressed": compressed, "dense bf16": dense}, prompt, args.tokens, args.repeats, args.compile)
    for name, timing in timings.items():
        print(f"{name:<12} {timing.tokens_per_second:8.2f} tokens/s  ({args.tokens} tokens, median of {args.repeats})")
    ratio = timings["compressed"].tokens_per_second / timings["dense bf16"].tokens_per_second
    mode = "torch.compile" if args.compile else "eager"
    print(f"speed-up: {ratio:.2f}x on {device} (threads: {torch.get_num_threads()}, {mode})")
    _print_kernels(compressed)
    return 0
