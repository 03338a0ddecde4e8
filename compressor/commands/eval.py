"""`compress eval NAME=MODEL [NAME=MODEL ...] --tasks T1,T2 -o DIR`: compare checkpoints with lm-eval.

Everything the user typed is checked before any model is loaded (names, tasks, include
paths, backend, output folder, model references); the report is written to a staging folder
and renamed into DIR only when every model has been evaluated.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

from compressor.commands.args import Parser, device_name, example_limit, non_negative_int, positive_int, quiet_datasets, quiet_transformers
from compressor.errors import ModelError, UserError
from compressor.extras import require_extra

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _flag_type(parse: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """An argparse type from a parser of compressor.evaluation.options: its ValueError is the one line."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = name
    return convert


def _options_module():
    from compressor.evaluation import options

    return options


def _seed(text: str):
    return _options_module().parse_seed(text)


def _gen_kwargs(text: str):
    return _options_module().parse_gen_kwargs(text)


def _batch_size(text: str):
    return _options_module().parse_batch_size(text)


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="compress eval", description="Evaluate checkpoints with lm-eval and write an accuracy-vs-size report.",
        usage="%(prog)s NAME=MODEL [NAME=MODEL ...] --tasks TASKS --output DIR [options]\n"
              "       %(prog)s --tasks list|list_groups|list_subtasks|list_tags [--include-path DIR]",
    )
    # NAME=MODEL and -o are required unless --tasks lists the task names (checked in run()).
    parser.add_argument("models", nargs="*", metavar="NAME=MODEL", help="a name for the report and a Hub id, local folder, .gguf or builtin: model")
    parser.add_argument("--tasks", "-t", required=True,
                        help="comma-separated lm-eval task names; built-in offline: perplexity, abstracts_match; "
                             "list, list_groups, list_subtasks or list_tags prints the names there are (no model needed)")
    parser.add_argument("--limit", type=example_limit, help="at most this many examples per task, or below 1 this fraction of each (as lm-eval)")
    parser.add_argument("--num-fewshot", type=non_negative_int, help="few-shot examples per prompt (default: each task's own)")
    parser.add_argument("--include-path", action="append", type=Path, default=[], help="folder of lm-eval task YAML files (repeatable)")
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="lm-eval model class (default hf; vllm needs vLLM)")
    parser.add_argument("--base", help="the model recovery is measured against (default: the first)")
    parser.add_argument("--output", "-o", type=Path, help="report folder (required)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty report folder")
    parser.add_argument("--batch-size", type=_flag_type(_batch_size, "batch size"), default=8, metavar="N|auto|auto:N",
                        help="lm-eval batch size: N, auto (largest that fits, found once) or auto:N (found N times); default 8")
    parser.add_argument("--max-batch-size", type=positive_int, metavar="N",
                        help="the largest size --batch-size auto tries (default: lm-eval's 64; on the CPU, the largest"
                             " batch whose logits over the model's whole context fit in half the available memory)")
    prompts = parser.add_argument_group("prompts and generation (as lm-eval's flags of the same names)")
    prompts.add_argument("--apply-chat-template", nargs="?", const=True, default=False, metavar="NAME",
                         help="wrap prompts in the tokenizer's chat template (or its template NAME); refused for a tokenizer without one")
    prompts.add_argument("--fewshot-as-multiturn", action=argparse.BooleanOptionalAction, default=None,
                         help="few-shot examples as user/assistant turns (default: on with --apply-chat-template)")
    prompts.add_argument("--system-instruction", metavar="TEXT", help="a system message (a system turn with a chat template)")
    prompts.add_argument("--gen-kwargs", type=_flag_type(_gen_kwargs, "generation kwargs"), metavar="K=V,...",
                         help="generation settings for generate_until tasks, e.g. temperature=0,max_gen_toks=64")
    prompts.add_argument("--seed", type=_flag_type(_seed, "seed"), metavar="N|R,N,T[,F]",
                         help="seeds for python random, numpy, torch and the few-shot sampler: one for all, or 3-4 "
                              "comma-separated (None leaves one unset; default 0,1234,1234,1234)")
    prompts.add_argument("--log-samples", action="store_true",
                         help="write lm-eval's per-sample records to OUT/samples/NAME/samples_TASK_DATE.jsonl")
    prompts.add_argument("--confirm-run-unsafe-code", action="store_true", help="allow tasks that run code the model writes")
    parser.add_argument("--trust-remote-code", action="store_true", help="run model code from the model's repository")
    parser.add_argument("--device", type=device_name, help="device for the hf backend (default: where the model loads)")
    parser.add_argument("--no-cache", action="store_true", help="evaluate every model even if its results are cached")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars (lm-eval's included)")
    return parser


def parse_model_pairs(items: list[str]) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for item in items:
        name, sep, reference = item.partition("=")
        if not sep or not name or not reference:
            raise UserError(f"expected NAME=MODEL, got {item!r}", where="compress eval")
        if not _NAME.match(name):
            raise UserError("model names may hold letters, digits, '.', '_' and '-' only", where=item)
        if name in seen:
            raise UserError(f"two models are named '{name}'; give each a distinct name", where=item)
        seen.add(name)
        pairs.append((name, reference))
    return pairs


def parse_task_list(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise UserError("no task given", where="--tasks")
    return list(dict.fromkeys(tasks))


def _check_report_spares_model(output: Path, name: str, model_path: str | Path | None) -> None:
    """The report replaces OUT as a whole (with --overwrite), so OUT must not be, or hold, a model it evaluates."""
    from compressor.checkpoint import input_replaced_by

    model = input_replaced_by(output, [model_path] if model_path is not None else [])
    if model is not None:
        raise UserError(f"the report would replace model '{name}' ({model}); pick another output folder", where="--output")


def _size_of(name: str, reference: str):
    from compressor.evaluation.loading import ModelLoadError, weights_folder
    from compressor.evaluation.size import measure_model_files
    from compressor.model_io import resolve_model

    gguf_file = resolve_model(reference).gguf_file
    try:
        return measure_model_files(gguf_file, None if gguf_file is not None else weights_folder(reference))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"model '{name}' failed to load: {err}", where=reference) from None


def lm_eval_options(args: argparse.Namespace):
    """The flags lm-eval takes, checked together (the rules lm-eval's own CLI applies)."""
    from compressor.evaluation.options import DEFAULT_SEEDS, LmEvalOptions, check_hf_generation_keys, resolve_fewshot_as_multiturn

    try:
        multiturn = resolve_fewshot_as_multiturn(args.fewshot_as_multiturn, args.apply_chat_template)
    except ValueError as err:
        raise UserError(str(err), where="--fewshot-as-multiturn") from None
    if args.gen_kwargs and args.backend == "hf":
        try:
            check_hf_generation_keys(args.gen_kwargs)
        except ValueError as err:
            raise UserError(str(err), where="--gen-kwargs") from None
    return LmEvalOptions(
        apply_chat_template=args.apply_chat_template,
        fewshot_as_multiturn=multiturn,
        system_instruction=args.system_instruction,
        gen_kwargs=args.gen_kwargs or {},
        seeds=args.seed or DEFAULT_SEEDS,
        log_samples=args.log_samples,
        confirm_run_unsafe_code=args.confirm_run_unsafe_code,
    )


def chat_templates(pairs: list[tuple[str, str]], choice: bool | str, trust_remote_code: bool) -> dict[str, str | None]:
    """Each model's chat template text (None without --apply-chat-template), read from its
    tokenizer before any weights load: a tokenizer without one is refused here."""
    if not choice:
        return {name: None for name, _ in pairs}
    from compressor.evaluation.loading import tokenizer_for
    from compressor.evaluation.options import chat_template_text

    found: dict[str, str | None] = {}
    for name, reference in pairs:
        try:
            found[name] = chat_template_text(tokenizer_for(reference, trust_remote_code=trust_remote_code), choice)
        except ValueError as err:
            raise UserError(f"model '{name}': {err}", where="--apply-chat-template") from None
    return found


def list_tasks(args: argparse.Namespace) -> int:
    """`--tasks list` and its kin: print the task names a run could ask for, evaluate nothing."""
    from compressor.evaluation.catalog import TaskCatalog
    from compressor.evaluation.task_list import render_listing, task_listing

    if args.models or args.output is not None:
        raise UserError("prints task names and evaluates nothing: leave out NAME=MODEL and --output", where=f"--tasks {args.tasks}")
    text = render_listing(task_listing(TaskCatalog(tuple(args.include_path)), args.tasks), args.tasks)
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # `compress eval --tasks list | head`: the reader took what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush fails no more
    return 0


def run(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    require_extra("lm_eval", "compress eval")
    from compressor.evaluation.task_list import LIST_WORDS

    if args.tasks in LIST_WORDS:
        return list_tasks(args)
    missing = [label for label, absent in (("NAME=MODEL", not args.models), ("--output/-o", args.output is None)) if absent]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    options = lm_eval_options(args)
    pairs = parse_model_pairs(args.models)
    names = [n for n, _ in pairs]
    base = args.base or names[0]
    if base not in names:
        raise UserError(f"no model named '{base}' (models: {', '.join(names)})", where="--base")

    from compressor.checkpoint import check_output_dir
    from compressor.output_lock import output_lock

    check_output_dir(args.output, args.overwrite)
    with output_lock(args.output):
        return _evaluate(args, pairs, base, options)


def _evaluate(args: argparse.Namespace, pairs: list[tuple[str, str]], base: str, options) -> int:
    """`compress eval` once OUT is held: resolve the tasks and models, evaluate, write the report."""
    from compressor.checkpoint import atomic_output_dir
    from compressor.evaluation.catalog import TaskCatalog
    import huggingface_hub.constants

    from compressor.evaluation.loading import model_identity, weights_folder
    from compressor.evaluation.runner import EvalSettings, EvalTarget, backend
    from compressor.model_io import load_config, resolve_model

    backend(args.backend).check()
    catalog = TaskCatalog(tuple(args.include_path))
    tasks = catalog.resolve(parse_task_list(args.tasks))
    for name, reference in pairs:
        try:
            source = resolve_model(reference)
        except ModelError as err:
            raise ModelError(f"model '{name}': {err.message}", where=reference) from None
        _check_report_spares_model(args.output, name, source.gguf_file or (source.load_path if source.kind == "local" else None))
        if source.kind == "hub" and huggingface_hub.constants.HF_HUB_OFFLINE and weights_folder(reference) is None:
            raise ModelError(f"model '{name}' is not in the local Hub cache, and the Hub is offline (HF_HUB_OFFLINE)", where=reference)
        if source.kind == "local":  # its config now: model code that needs --trust-remote-code, or not a causal LM
            try:
                load_config(source.load_path, reference, args.trust_remote_code)
            except ModelError as err:
                raise ModelError(f"model '{name}': {err.message}", where=reference) from None
    templates = chat_templates(pairs, args.apply_chat_template, args.trust_remote_code)
    if args.quiet:
        quiet_transformers()
        quiet_datasets()
        logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task notices, not its progress bars

    from compressor.evaluation.compare import Comparison
    from compressor.evaluation.results_cache import ResultsCache
    settings = EvalSettings(
        tuple(tasks), args.limit, args.backend, args.batch_size, args.device, args.num_fewshot,
        max_batch_size=args.max_batch_size, trust_remote_code=args.trust_remote_code, options=options, show_progress=not args.quiet,
    )
    comparison = Comparison(settings, catalog, None if args.no_cache else ResultsCache())
    for index, (name, reference) in enumerate(pairs, start=1):
        print(f"[{index}/{len(pairs)}] {name} = {reference}")
        identity = None if args.no_cache else model_identity(reference)
        target = EvalTarget(name, reference, identity=identity, chat_template=templates[name])
        comparison.add(target, _size_of(name, reference))
        target.loaded = None
        gc.collect()
    with atomic_output_dir(args.output) as staging:
        comparison.write(staging, base)
    print((args.output / "report.md").read_text().split("## ", 2)[1].split("\n", 1)[1].strip())
    print(f"report: {args.output / 'report.md'} (also report.json, report.html, accuracy_vs_size.png)")
    if options.log_samples:
        print(f"samples: {args.output / 'samples'}/<name>/samples_<task>_<date>.jsonl (lm-eval's layout)")
    return 0
