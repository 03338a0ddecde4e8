"""QLoRA (and plain LoRA) fine-tuning with peft, driven by accelerate.

QLoRA (Dettmers et al., 2023): the base loads in 4-bit NF4 with double quantization through
bitsandbytes (``BitsAndBytesConfig``), ``peft.prepare_model_for_kbit_training`` readies it
(norms and head in fp32, input gradients, gradient checkpointing), and LoRA adapters on every
linear layer are the only trained parameters. The loop uses ``accelerate.Accelerator``, so
``accelerate launch --num_processes N -m compressor.cli finetune ...`` runs it data-parallel
without changes (each process loads its own 4-bit copy on its own device). The step loop
(accumulation, data order) is ``compressor.finetune_loop``; ``--save-every`` / ``--resume`` are
``compressor.finetune_resume``; ``--optim`` is ``compressor.training.optimizers``.

``--merge`` order: load the base again in NF4 (bitsandbytes' rounding is deterministic, so it is
the very base the adapter was trained against), dequantize it to bf16, merge the adapter in
bf16, save. Merging into the dequantized NF4 weights reproduces what was trained; merging into
the original bf16 weights would add the adapter to a base it never saw; merging into NF4 itself
would re-round W + BA to the 4-bit grid, whose steps are larger than most of BA. To get a small
model again, re-compress the merged bf16 checkpoint with a recipe (``--recompress RECIPE``), so
the quantization error is controlled by calibrated GPTQ instead of plain re-rounding.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from compressor.checkpoint import atomic_output_dir
from compressor.errors import ModelError, UserError
from compressor.extras import is_installed, missing_extra
from compressor.finetune_data import embedding_rows, load_examples, padding_id, refuse_ids_beyond_embedding
from compressor.finetune_loop import StepPlan, make_loader, mean_loss, run_steps, steps_per_epoch
from compressor.finetune_modules import (
    check_modules_to_save,
    check_tie_kept,
    parse_modules_to_save,
    tie_line,
    train_copies_in_fp32,
)
from compressor.finetune_packing import pack_examples, refuse_unmasked_attention
from compressor.kernels.dispatched_module import DispatchedModule
from compressor.kernels.quant_linear import QuantLinear
from compressor.training.stability import (
    LR_SCHEDULERS,
    QLORA_MAX_GRAD_NORM,
    default_warmup_steps,
    warmup_problem,
    warmup_schedule,
)
from compressor.transformers_names import enable_activation_checkpointing


COMPRESSED_TENSORS = "compressed-tensors"


@dataclass
class FinetuneOptions:
    model: str
    dataset: str
    output: Path
    qlora: bool = True
    steps: int = 100
    epochs: int | None = None  # instead of steps: this many passes over the training examples
    lr: float = 2e-4
    max_grad_norm: float = QLORA_MAX_GRAD_NORM  # global-norm clip; 0 disables
    warmup_steps: int | None = None  # linear warm-up before the cosine decay; None: about 3 % of steps
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: str = "all-linear"
    batch_size: int = 4
    max_length: int = 512
    split: str = "train"
    eval_dataset: str | None = None
    eval_every: int = 0
    seed: int = 0
    gradient_checkpointing: bool = True
    merge: bool = False
    recompress: str | None = None
    overwrite: bool = False
    log_every: int = 10
    grad_accum: int = 1  # micro-batches per optimizer step (effective batch: batch_size × grad_accum × processes)
    lr_scheduler: str = "cosine"  # after the warm-up: cosine | linear | constant
    weight_decay: float = 0.0
    optim: str = "adamw_torch"  # a name of compressor.training.optimizers.OPTIMIZERS
    use_dora: bool = False  # peft LoraConfig(use_dora=True): weight-decomposed LoRA
    use_rslora: bool = False  # peft LoraConfig(use_rslora=True): scaling alpha/sqrt(r)
    save_every: int = 0  # step checkpoints into ADAPTER's work folder every N steps (0: none)
    resume: bool = False  # continue after the newest step checkpoint
    packing: bool = False  # several examples per sequence of max_length tokens (compressor.finetune_packing)
    modules_to_save: str | None = None  # comma-separated modules trained whole beside the adapters (peft modules_to_save)


@dataclass
class FinetuneSummary:
    output: Path
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)  # before clipping
    learning_rates: list[float] = field(default_factory=list)  # the lr each step used
    eval_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss)
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    merged: Path | None = None
    recompressed: Path | None = None
    seconds: float = 0.0
    processes: int = 1
    warmup_steps: int = 0
    base_quantization: str | None = None  # quant_method of the checkpoint trained on (besides --qlora's NF4)
    resumed_from: int = 0  # the step a --resume continued after
    packing: dict | None = None  # with --packing: examples, sequences and how full they are


def check_bitsandbytes() -> None:
    missing = missing_extra("bitsandbytes", "QLoRA")
    if missing is not None:
        raise UserError(f"{missing}; or drop --qlora for plain LoRA", where="--qlora")


def quantization_method(path: str) -> str | None:
    """`quant_method` of a local checkpoint's config.json (None: not quantized, or not local)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    quantization = json.loads(config_file.read_text()).get("quantization_config")
    return quantization.get("quant_method", "unknown") if quantization else None


def refuse_project_int4(path: str, reference: str) -> None:
    """A checkpoint that is already quantized is not a QLoRA base.

    NF4 would quantize the dequantized int4 weights a second time (two roundings stacked);
    train adapters on the compressed model itself instead (without --qlora, or with a recipe
    stage ``lowrank: {method: lora}``), which keeps its packed weights frozen and exact.
    """
    method = quantization_method(path)
    if method:
        raise ModelError(
            f"this checkpoint is already quantized ({method}); QLoRA would re-quantize its rounded weights to NF4."
            " Drop --qlora to train adapters on it directly (or use a recipe stage `lowrank: {method: lora}`),"
            " or fine-tune the original model",
            where=reference,
        )


def epoch_steps(examples: int, batch_size: int, epochs: int, processes: int, accumulation: int = 1) -> int:
    """Optimizer steps for `epochs` passes: each process takes its share of the batches, and an
    epoch's last step may accumulate fewer than `accumulation` of them."""
    return epochs * steps_per_epoch(math.ceil(math.ceil(examples / batch_size) / processes), accumulation)


def check_training_choices(options: FinetuneOptions, cuda_available: bool) -> None:
    """The options argparse cannot check alone (the Python API gets the same refusals)."""
    from compressor.training.optimizers import OPTIMIZERS, optimizer_problem

    if options.grad_accum < 1:
        raise UserError(f"must be 1 or more, got {options.grad_accum}", where="--grad-accum")
    if options.save_every < 0:
        raise UserError(f"must be 0 (no checkpoints) or more, got {options.save_every}", where="--save-every")
    if not (options.weight_decay >= 0 and math.isfinite(options.weight_decay)):
        raise UserError(f"must be a finite number ≥ 0, got {options.weight_decay}", where="--weight-decay")
    if options.lr_scheduler not in LR_SCHEDULERS:
        raise UserError(f"expected one of {', '.join(LR_SCHEDULERS)}, got {options.lr_scheduler!r}", where="--lr-scheduler")
    if options.optim not in OPTIMIZERS:
        raise UserError(f"expected one of {', '.join(OPTIMIZERS)}, got {options.optim!r}", where="--optim")
    problem = optimizer_problem(options.optim, cuda_available, is_installed("bitsandbytes"))
    if problem:
        raise UserError(problem, where="--optim")


def resolved_warmup_steps(options: FinetuneOptions) -> int:
    """The warm-up the run uses; bad settings raise UserError before any weight is read."""
    if options.max_grad_norm < 0:
        raise UserError(f"must be 0 (no clipping) or more, got {options.max_grad_norm}", where="--max-grad-norm")
    if options.warmup_steps is None:
        return default_warmup_steps(options.steps)
    problem = warmup_problem(options.warmup_steps, options.steps)
    if problem:
        raise UserError(problem, where="--warmup-steps")
    return options.warmup_steps


def parse_targets(text: str) -> str | list[str]:
    """`all-linear`, or the comma-separated module names (checked against the model by lora_targets)."""
    if text == "all-linear":
        return text
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise UserError(f"expected all-linear or module names, got {text!r}", where="--targets")
    return names


def _adaptable(module: torch.nn.Module) -> bool:
    """A layer LoRA can go on: a dense Linear (NF4's Linear4bit is one) or the project's QuantLinear."""
    return isinstance(module, (torch.nn.Linear, QuantLinear))


def _linear_names(model: torch.nn.Module) -> str:
    return ", ".join(sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _adaptable(m)}))


def _all_linear(model: torch.nn.Module) -> list[str]:
    """`all-linear` on a model with QuantLinear layers, which peft's own expansion skips (they are
    no nn.Linear): every Linear and QuantLinear by full name, the output head excluded as peft does."""
    head = model.get_output_embeddings()
    return sorted(n for n, m in model.named_modules() if _adaptable(m) and m is not head)


def _refuse_other_compressed_layers(model: torch.nn.Module, reference: str) -> None:
    kinds = sorted({type(m).__name__ for m in model.modules() if isinstance(m, DispatchedModule) and not isinstance(m, QuantLinear)})
    if kinds:
        raise ModelError(
            f"LoRA training on compressed layers of kind {', '.join(kinds)} is not supported (only weight-only"
            " int QuantLinear); fine-tune the original model",
            where=reference,
        )


def _matching(model: torch.nn.Module, target: str) -> list[torch.nn.Module]:
    """The modules peft would adapt for `target` in a list: the name itself or a dotted suffix."""
    return [m for n, m in model.named_modules() if n == target or n.endswith(f".{target}")]


def lora_targets(model: torch.nn.Module, targets: str | list[str]) -> str | list[str]:
    """Refuse a name that matches no module: peft raises only when none matches, and then as a traceback."""
    if isinstance(targets, str):
        return _all_linear(model) if any(isinstance(m, QuantLinear) for m in model.modules()) else targets
    missing = [t for t in targets if not _matching(model, t)]
    if missing:
        raise UserError(f"no module of the model is named {', '.join(missing)} (its Linear layers: {_linear_names(model)})",
                        where="--targets")
    return targets


def add_lora(model: torch.nn.Module, lora, targets: str | list[str]) -> torch.nn.Module:
    """peft's model with adapters; a target peft cannot adapt (a ModuleList, a norm) is a UserError."""
    from peft import get_peft_model

    from compressor.peft_quant import device_anchors

    # Described before peft runs: a failed injection leaves some layers already wrapped.
    kinds = targets if isinstance(targets, str) else "; ".join(
        f"{t} ({', '.join(sorted({type(m).__name__ for m in _matching(model, t)}))})" for t in targets)
    linear = _linear_names(model)
    try:
        with device_anchors(model):
            return get_peft_model(model, lora)
    except ValueError:  # peft's message holds the module's whole multi-line repr; name the types instead
        raise UserError(f"LoRA cannot go on {kinds}: name Linear layers ({linear})", where="--targets") from None


def _quantization_config():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def _load_base(path: str, reference: str, device, qlora: bool):
    from compressor.load_checks import load_causal_lm

    if qlora:
        model = load_causal_lm(path, reference, quantization_config=_quantization_config(), device_map={"": device})
        keep_nf4_trainable_layout(model)
        return model
    if quantization_method(path) == COMPRESSED_TENSORS:
        # Our own modules, not transformers' compressed-tensors Linear (which has no `weight`, so
        # peft cannot wrap it): packed weights stay frozen, gradients flow through to the input.
        from compressor.runtime import load

        model = load(path, device=device, prepare_kernels=False)
        _refuse_other_compressed_layers(model, reference)
        return model
    return load_causal_lm(path, reference, dtype="auto").to(device)


def _dense_copy_of_compressed(path: str) -> torch.nn.Module:
    """The compressed checkpoint with every QuantLinear replaced by a bf16 Linear holding its
    dequantized weight: the very base the adapter was trained against, as plain transformers."""
    from compressor.decode_speed import densify
    from compressor.runtime import load

    return densify(load(path, prepare_kernels=False)).to(torch.bfloat16)


def keep_nf4_trainable_layout(model: torch.nn.Module) -> int:
    """Stop bitsandbytes repacking NF4 weights for its CPU inference kernel; returns the layers changed.

    On a CPU with AVX-512 BF16, bitsandbytes 0.50's ``Linear4bit.forward`` in eval mode without
    gradients (the held-out evaluation) rewrites the weight in place into a packed layout and never
    restores it; every later forward then takes ``gemv_4bit``, which has no backward, so the
    gradient stops flowing through the frozen base matmuls and the LoRA gradients are wrong
    (measured on SmolLM2: they change by ~100 % after one evaluation while the loss does not).
    That is what made the first 200-step QLoRA run diverge. Keeping the trainable layout costs
    the evaluation the packed kernel's speed and makes it use the very numerics training uses.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def run_finetune(options: FinetuneOptions, echo: Callable[[str], None] = print) -> FinetuneSummary:
    from accelerate import Accelerator

    from compressor.checkpoint import check_output_dir
    from compressor.output_lock import output_lock

    if options.qlora:
        check_bitsandbytes()
    check_training_choices(options, torch.cuda.is_available())
    # With --epochs, once the examples are counted (still before any weight is read).
    warmup_steps = resolved_warmup_steps(options) if options.epochs is None else None
    target_names = parse_targets(options.targets)
    save_names = parse_modules_to_save(options.modules_to_save)
    # Without CUDA, say so: accelerate then runs several launched processes as MULTI_CPU (gloo).
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    check_output_dir(options.output, options.overwrite, inputs=[options.model, options.dataset, options.eval_dataset or ""])  # every process: all of them must stop on bad input
    # Only the main process writes OUT, so only it holds OUT's lock.
    with output_lock(options.output) if accelerator.is_main_process else nullcontext():
        return _finetune_holding_output(options, accelerator, target_names, save_names, warmup_steps, echo)


def _refuse_dora_on_packed_layers(path: str, options: FinetuneOptions) -> None:
    if options.use_dora and not options.qlora and quantization_method(path) == COMPRESSED_TENSORS:
        raise UserError(
            "DoRA normalises each base weight column, and this compressed-tensors checkpoint's packed layers have no"
            " float weight to normalise; drop --use-dora (plain LoRA trains on them) or fine-tune the original model",
            where="--use-dora",
        )


def _finetune_holding_output(options: FinetuneOptions, accelerator, target_names: str | list[str], save_names: list[str] | None,
                             warmup_steps: int | None, echo: Callable[[str], None]) -> FinetuneSummary:
    from accelerate.utils import set_seed
    from peft import prepare_model_for_kbit_training

    from compressor.checkpoint import prepare_workdir, workdir_for
    from compressor.finetune_resume import FinetuneCheckpoints, finetune_key
    from compressor.peft_quant import lora_config_for_quantized
    from compressor.model_io import load_config, load_tokenizer, prepare_source
    from compressor.training.optimizers import build_optimizer
    from compressor.training.trainable import TrainableSet

    _source, path, _folder = prepare_source(options.model)
    config = load_config(path, options.model, False)  # refuses a config that is not a causal LM
    if options.qlora:
        refuse_project_int4(path, options.model)
    _refuse_dora_on_packed_layers(path, options)
    tokenizer = load_tokenizer(path, options.model, False)
    rows = embedding_rows(config)
    pad_id = padding_id(tokenizer, rows)
    train = load_examples(options.dataset, tokenizer, max_length=options.max_length, split=options.split)
    held_out = load_examples(options.eval_dataset, tokenizer, max_length=options.max_length) if options.eval_dataset else None
    refuse_ids_beyond_embedding(train, rows, options.dataset)
    if held_out:
        refuse_ids_beyond_embedding(held_out, rows, options.eval_dataset)
    _say_cut(train, options, accelerator, echo)
    packing_stats = None
    if options.packing:
        train, packing_stats = pack_examples(train, options.max_length)
        held_out = pack_examples(held_out, options.max_length)[0] if held_out else None
        if accelerator.is_main_process:
            echo(packing_stats.line())
    if options.epochs is not None:
        options = replace(options, steps=epoch_steps(len(train), options.batch_size, options.epochs, accelerator.num_processes,
                                                     options.grad_accum))
        warmup_steps = resolved_warmup_steps(options)
    workdir = prepare_workdir(options.output, options.resume) if accelerator.is_main_process else workdir_for(options.output)
    accelerator.wait_for_everyone()

    set_seed(options.seed)
    model = _load_base(path, options.model, accelerator.device, options.qlora)
    model.config.use_cache = False
    if options.qlora:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=options.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif options.gradient_checkpointing:
        enable_activation_checkpointing(model)
        model.enable_input_require_grads()
    if options.packing:
        refuse_unmasked_attention(model)
    targets = lora_targets(model, target_names)
    keep_tie = check_modules_to_save(model, save_names, targets) if save_names else False
    lora = lora_config_for_quantized(  # a LoraConfig that also wraps QuantLinear layers
        r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout, target_modules=targets,
        bias="none", task_type="CAUSAL_LM", use_dora=options.use_dora, use_rslora=options.use_rslora,
        modules_to_save=save_names, ensure_weight_tying=keep_tie,
    )
    model = add_lora(model, lora, targets)
    if keep_tie:
        check_tie_kept(model)
        if accelerator.is_main_process:
            echo(tie_line(save_names))
    restore_copies = train_copies_in_fp32(model)  # (no-op without --modules-to-save or on an fp32 base)
    # Named before accelerate wraps the model (DDP prefixes every name with `module.`).
    trainable = TrainableSet(named={name: p for name, p in model.named_parameters() if p.requires_grad})
    optimizer = build_optimizer(options.optim, trainable.parameters(), options.lr, options.weight_decay)
    loader = make_loader(train, options.batch_size, pad_id, options.seed, packed=options.packing)
    eval_loader = make_loader(held_out, options.batch_size, pad_id, options.seed, shuffle=False, packed=options.packing) if held_out else None
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    assert warmup_steps is not None  # resolved above, from --epochs when given
    scheduler = warmup_schedule(optimizer, LR_SCHEDULERS[options.lr_scheduler], warmup_steps, options.steps)

    summary = FinetuneSummary(options.output, processes=accelerator.num_processes, warmup_steps=warmup_steps,
                              base_quantization=quantization_method(path),
                              packing=asdict(packing_stats) | {"fill": round(packing_stats.fill, 4)} if packing_stats else None)
    key = finetune_key(_options_record(options), Path(path) if Path(path).is_dir() else None, accelerator.device,
                       accelerator.num_processes)
    checkpoints = FinetuneCheckpoints(workdir, key, options.save_every, options.resume, echo)
    restored = checkpoints.restore(trainable, optimizer, scheduler, accelerator)
    if restored is not None:
        summary.resumed_from = restored.step
        _restore_curves(summary, restored)
    elif eval_loader is not None:
        summary.eval_loss_before = mean_loss(model, eval_loader, accelerator)
        summary.eval_curve.append((0, summary.eval_loss_before))
        if accelerator.is_main_process:
            echo(f"held-out loss before: {summary.eval_loss_before:.4f}")
    if accelerator.is_main_process:
        echo(_plan_line(options, warmup_steps, accelerator.num_processes))
    plan = StepPlan(options.steps, options.grad_accum, options.max_grad_norm, options.log_every, options.eval_every)
    started = time.perf_counter() - summary.seconds

    def checkpoint(step: int) -> None:
        summary.seconds = time.perf_counter() - started
        checkpoints.save_if_due(step, options.steps, trainable, optimizer, scheduler, accelerator, _training_state(summary, step))

    try:
        run_steps(model, optimizer, scheduler, loader, eval_loader, accelerator, plan, summary, summary.resumed_from, checkpoint, echo)
        restore_copies()  # whole-module copies back in the base's dtype: evaluated and saved as they reload
        summary.seconds = time.perf_counter() - started
        _finish(model, tokenizer, path, options, summary, eval_loader, accelerator, echo)
    except BaseException:  # Ctrl-C, SIGTERM or a failure before ADAPTER is in place: say what stays for --resume
        note = checkpoints.kept_note() if accelerator.is_main_process else None
        if note is not None:
            print(note, file=sys.stderr)
        raise
    checkpoints.finish(accelerator)
    accelerator.wait_for_everyone()
    return summary


def _finish(model, tokenizer, path: str, options: FinetuneOptions, summary: FinetuneSummary, eval_loader, accelerator,
            echo: Callable[[str], None]) -> None:
    """The held-out loss after training, then ADAPTER (and its merged / recompressed copies) written whole."""
    if eval_loader is not None:
        summary.eval_loss_after = mean_loss(model, eval_loader, accelerator)
        summary.eval_curve.append((options.steps, summary.eval_loss_after))
        if accelerator.is_main_process:
            echo(f"held-out loss after: {summary.eval_loss_after:.4f}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # Written beside OUT and renamed into place at the end: an interrupted save, merge or
        # recompression leaves OUT absent, never an adapter folder that looks complete.
        with atomic_output_dir(options.output) as staging:
            _save_adapter(accelerator.unwrap_model(model), tokenizer, options, summary, staging)
            if options.merge or options.recompress:
                merge_adapter(path, staging, staging / "merged", qlora=options.qlora)
                summary.merged = options.output / "merged"
                echo(f"merged bf16 checkpoint: {summary.merged}")
            if options.recompress:
                _recompress(staging / "merged", options.recompress, staging / "compressed", echo)
                summary.recompressed = options.output / "compressed"


def _say_cut(examples, options: FinetuneOptions, accelerator, echo: Callable[[str], None]) -> None:
    """Examples longer than --max-length are cut, packed or not (as TRL's SFTTrainer truncates to max_length)."""
    cut = [e.cut for e in examples if e.cut]
    if cut and accelerator.is_main_process:
        echo(f"{len(cut)} of {len(examples)} training examples were longer than --max-length {options.max_length}"
             f" and were cut ({sum(cut)} tokens dropped)")


def _plan_line(options: FinetuneOptions, warmup_steps: int, processes: int) -> str:
    from compressor.training.optimizers import OPTIMIZERS

    clipping = "at global norm " + format(options.max_grad_norm, "g") if options.max_grad_norm > 0 else "off"
    batch = options.batch_size * options.grad_accum * processes
    unit = "packed sequences" if options.packing else "examples"
    return (f"{options.steps} steps of {batch} {unit} ({options.batch_size} × {options.grad_accum} accumulated × {processes}"
            f" processes): {OPTIMIZERS[options.optim].words}, lr {options.lr:g}, warm-up {warmup_steps} steps,"
            f" {options.lr_scheduler} schedule; gradient clipping {clipping}")


def _training_state(summary: FinetuneSummary, step: int):
    from compressor.training.checkpoints import TrainingState

    curve = [{"loss": loss, "grad_norm": norm, "lr": lr}
             for loss, norm, lr in zip(summary.losses, summary.grad_norms, summary.learning_rates)]
    extra = {"eval_curve": summary.eval_curve, "eval_loss_before": summary.eval_loss_before, "seconds": summary.seconds}
    return TrainingState(step, curve, extra)


def _restore_curves(summary: FinetuneSummary, state) -> None:
    summary.losses = [row["loss"] for row in state.losses]
    summary.grad_norms = [row["grad_norm"] for row in state.losses]
    summary.learning_rates = [row["lr"] for row in state.losses]
    summary.eval_curve = [tuple(point) for point in state.extra.get("eval_curve", [])]
    summary.eval_loss_before = state.extra.get("eval_loss_before")
    summary.seconds = float(state.extra.get("seconds", 0.0))


def _options_record(options: FinetuneOptions) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()}


def _save_adapter(model, tokenizer, options: FinetuneOptions, summary: FinetuneSummary, folder: Path) -> None:
    from compressor.adapter_card import build_adapter_card

    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    log = {
        "options": _options_record(options),
        "losses": summary.losses,
        "grad_norms": summary.grad_norms,
        "learning_rates": summary.learning_rates,
        "eval_curve": summary.eval_curve,
        "eval_loss_before": summary.eval_loss_before,
        "eval_loss_after": summary.eval_loss_after,
        "warmup_steps": summary.warmup_steps,
        "seconds": round(summary.seconds, 2),
        "processes": summary.processes,
        "base_quantization": summary.base_quantization,
        "resumed_from": summary.resumed_from,
        "effective_batch_size": options.batch_size * options.grad_accum * summary.processes,
        "packing": summary.packing,
    }
    (folder / "training.json").write_text(json.dumps(log, indent=2) + "\n")
    # In place of peft's blank template (whose base_model is a local path the Hub would refuse).
    card = build_adapter_card(folder, local_name=options.output.resolve().name)
    (folder / "README.md").write_text(str(card), encoding="utf-8")


def merge_adapter(base_path: str, adapter: Path, out: Path, *, qlora: bool) -> Path:
    """Dequantize the NF4 base to bf16, merge the adapter in bf16, save (see the module doc)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if qlora:
        base = AutoModelForCausalLM.from_pretrained(base_path, quantization_config=_quantization_config(), device_map={"": "cpu"})
        base = base.dequantize().to(torch.bfloat16)
    elif quantization_method(base_path) == COMPRESSED_TENSORS:
        base = _dense_copy_of_compressed(base_path)
    else:
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.config.use_cache = True
    for attribute in ("quantization_config",):
        if hasattr(merged.config, attribute):
            delattr(merged.config, attribute)
    merged.hf_quantizer = None
    merged.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(adapter)).save_pretrained(str(out))
    return out


def _recompress(merged: Path, recipe_name: str, out: Path, echo: Callable[[str], None]) -> Path:
    from compressor.pipeline import RunOptions, run_recipe
    from compressor.recipe import load_recipe

    summary = run_recipe(str(merged), load_recipe(recipe_name), RunOptions(out_dir=out, show_progress=False), echo)
    return summary.out_dir
