"""`compress finetune MODEL --qlora --dataset D -o ADAPTER`: QLoRA / LoRA fine-tuning with peft."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from compressor.commands.args import Parser, non_negative_int, positive_int, quiet_transformers
from compressor.commands.library_notices import drop_library_noise
from compressor.training.optimizers import OPTIMIZERS
from compressor.training.stability import LR_SCHEDULERS, QLORA_MAX_GRAD_NORM, warmup_problem

drop_library_noise()  # before peft imports bitsandbytes, which logs at import
DEFAULT_STEPS = 100


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):  # an infinite lr trains NaN adapters
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number ≥ 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number ≥ 0, got {text!r}")
    return value


def seed_value(text: str) -> int:
    """What numpy's and torch's seeding accept: 0 ≤ seed < 2**32."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**32 - 1, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**32 - 1, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="compress finetune", description="Train LoRA adapters (QLoRA: on a 4-bit NF4 base) with peft.")
    parser.add_argument("model", help="Hub id, local checkpoint folder, .gguf file, or builtin:smollm2-135m-instruct")
    parser.add_argument("--dataset", required=True, help=".txt, .jsonl/.json (text, messages, or instruction/output records), or a Hub dataset id")
    parser.add_argument("--output", "-o", type=Path, required=True, help="adapter folder (a standard peft adapter)")
    parser.add_argument("--qlora", action="store_true", help="load the base in NF4 with double quantization (bitsandbytes)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive_int, help="optimizer steps (default 100)")
    length.add_argument("--epochs", type=positive_int, help="instead of --steps: passes over the training examples")
    parser.add_argument("--lr", type=positive_float, default=2e-4, help="peak learning rate (after the warm-up)")
    parser.add_argument("--lr-scheduler", choices=list(LR_SCHEDULERS), default="cosine",
                        help="after the warm-up: cosine or linear decay to 0, or constant (default cosine)")
    parser.add_argument("--optim", choices=list(OPTIMIZERS), default="adamw_torch",
                        help="optimizer (transformers' names); *_8bit/*_32bit are bitsandbytes', paged_* need CUDA")
    parser.add_argument("--weight-decay", type=non_negative_float, default=0.0, help="decoupled weight decay (default 0)")
    parser.add_argument("--max-grad-norm", type=non_negative_float, default=QLORA_MAX_GRAD_NORM,
                        help="clip the global gradient norm to this before each step (QLoRA: 0.3); 0 disables")
    parser.add_argument("--warmup-steps", type=non_negative_int,
                        help="steps of linear lr warm-up, fewer than --steps (default: about 3 %% of --steps)")
    parser.add_argument("--r", "--rank", dest="r", type=positive_int, default=16, help="LoRA rank")
    parser.add_argument("--alpha", type=positive_float, default=32.0, help="LoRA alpha (scaling alpha/r)")
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--use-dora", action="store_true", help="DoRA (peft use_dora): weight-decomposed LoRA, a trained magnitude per output")
    parser.add_argument("--use-rslora", action="store_true", help="rank-stabilized LoRA (peft use_rslora): scaling alpha/sqrt(r) instead of alpha/r")
    parser.add_argument("--targets", default="all-linear", help="all-linear, or comma-separated module names")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="examples per micro-batch (per process)")
    parser.add_argument("--grad-accum", type=positive_int, default=1,
                        help="micro-batches per optimizer step: effective batch = batch size × N (× processes)")
    parser.add_argument("--max-length", type=positive_int, default=512,
                        help="tokens per example (longer ones are cut); with --packing, tokens per packed sequence")
    parser.add_argument("--packing", action="store_true",
                        help="pack several examples into each sequence of up to the max length (best-fit decreasing, as TRL's"
                             " packing=True): no compute on padding; positions restart per example and transformers masks"
                             " attention between them; --batch-size then counts packed sequences")
    parser.add_argument("--modules-to-save", metavar="NAME[,NAME]",
                        help="also train full copies of these modules (peft modules_to_save), e.g. lm_head or embed_tokens;"
                             " saved in the adapter. A tied lm_head/embed_tokens pair trains as one shared copy")
    parser.add_argument("--split", default="train", help="split of a Hub dataset")
    parser.add_argument("--eval-dataset", help="held-out examples (same formats): loss before and after training")
    parser.add_argument("--eval-every", type=non_negative_int, default=0,
                        help="also report the held-out loss every N steps (default 0: only before and after training)")
    parser.add_argument("--seed", type=seed_value, default=0, help="0 to 2**32 - 1 (default 0)")
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--merge", action="store_true", help="also write OUTPUT/merged: NF4 base dequantized to bf16 + adapter merged")
    parser.add_argument("--recompress", metavar="RECIPE", help="after merging, compress OUTPUT/merged with this recipe into OUTPUT/compressed")
    parser.add_argument("--save-every", type=non_negative_int, default=0,
                        help="every N steps, checkpoint adapter, optimizer, schedule, RNG and step into OUTPUT's work folder (.OUTPUT.work)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run after its last step checkpoint")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--log-every", type=non_negative_int, default=10, help="print the loss every N steps (default 10; 0: never)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    return parser


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.quiet:  # before anything loads: the weight-loading bar would come before an error line
        quiet_transformers()
    from compressor.finetune import FinetuneOptions, check_bitsandbytes, run_finetune

    if args.qlora:
        check_bitsandbytes()
    if not 0 <= args.dropout < 1:
        raise SystemExit(_parser().error(f"--dropout must be in [0, 1), got {args.dropout}"))
    if args.steps is None and args.epochs is None:
        args.steps = DEFAULT_STEPS
    if args.steps is not None and args.warmup_steps is not None and (problem := warmup_problem(args.warmup_steps, args.steps)):
        _parser().error(f"--warmup-steps {problem}")
    if args.recompress:
        from compressor.recipe import load_recipe

        load_recipe(args.recompress)  # a bad recipe fails before training, not after
    options = FinetuneOptions(
        model=args.model,
        dataset=args.dataset,
        output=args.output,
        qlora=args.qlora,
        steps=args.steps or 0,  # with --epochs, set once the examples are counted
        epochs=args.epochs,
        lr=args.lr,
        max_grad_norm=args.max_grad_norm,
        warmup_steps=args.warmup_steps,
        r=args.r,
        alpha=args.alpha,
        dropout=args.dropout,
        targets=args.targets,
        batch_size=args.batch_size,
        max_length=args.max_length,
        split=args.split,
        eval_dataset=args.eval_dataset,
        eval_every=args.eval_every,
        seed=args.seed,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        merge=args.merge,
        recompress=args.recompress,
        overwrite=args.overwrite,
        log_every=args.log_every,
        grad_accum=args.grad_accum,
        lr_scheduler=args.lr_scheduler,
        weight_decay=args.weight_decay,
        optim=args.optim,
        use_dora=args.use_dora,
        use_rslora=args.use_rslora,
        save_every=args.save_every,
        resume=args.resume,
        packing=args.packing,
        modules_to_save=args.modules_to_save,
    )
    summary = run_finetune(options)  # checks --optim and the rest before any weight is read
    if summary.losses:
        print(f"adapter: {summary.output} ({len(summary.losses)} steps, loss {summary.losses[0]:.4f} → {summary.losses[-1]:.4f}, {summary.seconds:.0f} s)")
    return 0
