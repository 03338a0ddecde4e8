"""Run lm-eval on one model and pull the numbers out of its results.

    tasks not already cached ─▶ lm-eval Task/Group objects, built once (data read) before the model loads
    target (in-memory model, or a reference) ─▶ backend (lm-eval's HFLM or VLLM class)
        ─▶ lm_eval.simple_evaluate on those objects ─▶ results JSON
        ─▶ one slice per requested task (cached for reference models) ─▶ merged results

`extract_metrics` turns a results JSON into ``{task: {metric: Metric}}`` with the stderr and
the direction lm-eval reports for each metric.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from compressor.errors import UserError, first_line
from compressor.evaluation.bootstrap import in_process_bootstrap
from compressor.evaluation.catalog import ResolvedTask, TaskCatalog, TaskError, lm_eval_version
from compressor.evaluation.git_hash import quiet_git_hash_lookup
from compressor.evaluation.options import LmEvalOptions
from compressor.evaluation.progress import QuietableRequests, lm_eval_bars_hidden, quietable
from compressor.evaluation.results_cache import CacheKey, ResultsCache
from compressor.model_io import LoadedModel

PER_TASK_SECTIONS = ("results", "groups", "configs", "versions", "n-shot", "higher_is_better", "n-samples")


@dataclass(frozen=True)
class Metric:
    value: float
    stderr: float | None
    higher_is_better: bool | None


@dataclass
class EvalTarget:
    """What to evaluate: a model already in memory, or a reference a backend loads itself."""

    name: str
    reference: str
    loaded: LoadedModel | None = None
    identity: str | None = None  # set for models whose results may be cached
    chat_template: str | None = None  # the chat template's text, when one is applied (its hash is in the cache key)


@dataclass(frozen=True)
class EvalSettings:
    tasks: tuple[ResolvedTask, ...]
    limit: int | float | None  # as lm-eval takes it: a count, or below 1 a fraction of each task
    backend: str = "hf"
    batch_size: int | str = 8  # or lm-eval's "auto" / "auto:N"
    device: str | None = None
    num_fewshot: int | None = None  # None: each task's own default, as in lm-eval
    max_batch_size: int | None = None  # the ceiling of "auto" (None: on the CPU batch_ceiling's, else lm-eval's 64)
    max_batch_size_source: str = "flag"  # where a max_batch_size given came from: "flag" or "recipe"
    trust_remote_code: bool = False
    options: LmEvalOptions = LmEvalOptions()
    show_progress: bool = True  # False (-q): lm-eval draws no progress bar (compressor.evaluation.progress)

    @property
    def searches_batch_size(self) -> bool:
        """`auto` or `auto:N`: lm-eval finds the batch size by trial, from max_batch_size down."""
        return str(self.batch_size).startswith("auto")


# ---------------------------------------------------------------- backends

@dataclass(frozen=True)
class BatchCeiling:
    """The largest batch lm-eval's `--batch-size auto` search tried on one model, and whence it came:
    "flag" (--max-batch-size), "recipe" (evaluate.max_batch_size), "cpu_memory_ceiling"
    (`batch_ceiling.ceiling_for`) or "lm-eval default" (HFLM's 64). Both None where lm-eval
    searched nothing: a fixed batch size, or the vLLM backend (which batches by itself)."""

    value: int | None = None
    source: str | None = None


NO_SEARCH = BatchCeiling()


def _float32_logits_hflm():
    """lm-eval's HFLM with logits cast to fp32 before its log-softmax and sums.

    HFLM takes the log-softmax in the model's dtype; for a bf16 model the summed
    log-likelihood of a 300-token document is then rounded to bf16's 8 bits of mantissa
    (steps of 1 nat near 256), which hides the differences a report is meant to show.
    """
    from lm_eval.models.huggingface import HFLM

    class Float32LogitsHFLM(QuietableRequests, HFLM):
        # Also counts the tokens its forward passes process and the seconds they take,
        # for the report's tokens/s (scoring throughput at lm-eval's batch size).
        forward_tokens = 0
        forward_seconds = 0.0
        batch_ceiling = NO_SEARCH  # set by _hf_model, for the report

        def _model_call(self, inps, *args, **kwargs):
            started = time.perf_counter()
            logits = super()._model_call(inps, *args, **kwargs).float()
            self.forward_seconds += time.perf_counter() - started
            self.forward_tokens += int(inps.numel())
            return logits

        def _detect_batch_size(self, *args, **kwargs):
            # Its trial forward passes (--batch-size auto) are not scoring: keep them out of tokens/s.
            counted = self.forward_tokens, self.forward_seconds
            try:
                return super()._detect_batch_size(*args, **kwargs)
            finally:
                self.forward_tokens, self.forward_seconds = counted

    return Float32LogitsHFLM


def _hf_model(target: EvalTarget, settings: EvalSettings):
    if target.loaded is None:
        from compressor.evaluation.loading import load_named

        target.loaded = load_named(target.name, target.reference, trust_remote_code=settings.trust_remote_code)
    model = target.loaded.model
    if settings.device is not None:
        model = model.to(settings.device)
    # Handing HFLM a model object is how this runner works; its two warnings about it say nothing.
    lm_eval_logger = logging.getLogger("lm_eval.models.huggingface")
    level = lm_eval_logger.level
    lm_eval_logger.setLevel(logging.ERROR)
    sizing = {"max_batch_size": settings.max_batch_size} if settings.max_batch_size is not None else {}
    chat = settings.options.apply_chat_template
    # lm-eval 0.4.13's HFLM builds prompts with the tokenizer's default template whatever name it is
    # given; a named one reaches transformers' apply_chat_template through chat_template_args.
    template = {"chat_template_args": {"chat_template": chat}} if isinstance(chat, str) else {}
    try:
        lm = _float32_logits_hflm()(
            pretrained=model, tokenizer=target.loaded.tokenizer, batch_size=settings.batch_size, **sizing, **template
        )
    finally:
        lm_eval_logger.setLevel(level)
    lm.show_progress = settings.show_progress
    if not settings.searches_batch_size:
        return lm  # a fixed batch size: no search, whatever max_batch_size says
    if sizing:
        lm.batch_ceiling = BatchCeiling(settings.max_batch_size, settings.max_batch_size_source)
    elif torch.device(lm.device).type == "cpu":
        from compressor.evaluation.batch_ceiling import ceiling_for

        lm.max_batch_size = ceiling_for(lm)  # where its search starts: lm-eval's 64 can outgrow a CPU machine
        lm.batch_ceiling = BatchCeiling(lm.max_batch_size, "cpu_memory_ceiling")
    else:
        lm.batch_ceiling = BatchCeiling(lm.max_batch_size, "lm-eval default")
    return lm


def _vllm_model(target: EvalTarget, settings: EvalSettings):
    from lm_eval.api.registry import get_model

    from compressor.evaluation.loading import weights_folder

    folder = weights_folder(target.reference)
    path = str(folder) if folder is not None else target.reference
    lm = quietable(get_model("vllm"))(pretrained=path, batch_size="auto", trust_remote_code=settings.trust_remote_code)
    lm.show_progress = settings.show_progress  # vLLM's own bar while it generates is vLLM's (lm-eval turns it on for batch auto)
    return lm


def _vllm_available() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise UserError("--backend vllm needs vLLM, which is not installed (pip install vllm; it needs a GPU)", where="--backend")


@dataclass(frozen=True)
class Backend:
    build: Callable[[EvalTarget, EvalSettings], Any]
    check: Callable[[], None]
    needs_reference: bool  # True: loads from disk itself and cannot take an in-memory model


BACKENDS: dict[str, Backend] = {
    "hf": Backend(build=_hf_model, check=lambda: None, needs_reference=False),
    "vllm": Backend(build=_vllm_model, check=_vllm_available, needs_reference=True),
}


def backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise UserError(f"unknown backend '{name}' (known: {', '.join(BACKENDS)})", where="--backend")
    return BACKENDS[name]


# ---------------------------------------------------------------- results JSON

def json_safe(results: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's results as plain JSON data (it holds callables and numpy values)."""
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(results, default=handle_non_serializable))


def _members(results: dict[str, Any], name: str) -> list[str]:
    """`name` and, for a group, every task under it."""
    names = [name]
    for child in results.get("group_subtasks", {}).get(name, []):
        names.extend(_members(results, child))
    return names


def task_slice(results: dict[str, Any], name: str, tagged: list[str] | None = None) -> dict[str, Any]:
    """The parts of a results JSON that belong to one requested task (and its subtasks); for a
    tag, which lm-eval's results do not name, the parts of the tasks it tagged (`tagged`)."""
    names = _members(results, name) if tagged is None else [m for t in tagged for m in _members(results, t)]
    sliced: dict[str, Any] = {s: {n: results[s][n] for n in names if n in results.get(s, {})} for s in PER_TASK_SECTIONS}
    sliced["group_subtasks"] = {n: results["group_subtasks"][n] for n in names if n in results.get("group_subtasks", {})}
    return sliced


def name_model(results: dict[str, Any], reference: str) -> None:
    """Name the model in `results` as the report does. lm-eval's `config.model` is the path the
    model was loaded from (its `config._name_or_path`): for a merged base that is a temporary
    folder deleted when the run ends, for a compressed model the input's folder, not OUT.
    (`model_args` stays lm-eval's: None, as it is handed a model object, not arguments.)"""
    config = results.get("config")
    results["config"] = {**(config if isinstance(config, dict) else {}), "model": reference}


def merge_slices(slices: list[dict[str, Any]], header: dict[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {s: {} for s in (*PER_TASK_SECTIONS, "group_subtasks")}
    for part in slices:
        for section, values in part.items():
            merged.setdefault(section, {}).update(values)
    merged.update(header)
    return merged


def _metric_order(row: dict[str, Any], config: dict[str, Any] | None) -> list[str]:
    """The row's keys in the order of the task's `metric_list` (then as they come).

    The report's summary column and plot take each task's first metric; the row's own key
    order differs between a fresh run and the results cache (saved with sorted keys), while
    the task's `metric_list` is a list and keeps its order."""
    listed = [m.get("metric") for m in (config or {}).get("metric_list") or [] if isinstance(m, dict)]
    rank = {name: index for index, name in enumerate(listed)}
    return sorted(row, key=lambda key: rank.get(key.split(",", 1)[0], len(rank)))


def _parse_row(row: dict[str, Any], directions: dict[str, Any], config: dict[str, Any] | None = None) -> dict[str, Metric]:
    metrics = {}
    for key in _metric_order(row, config):
        value = row[key]
        if "," not in key or "_stderr," in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metric, filter_name = key.split(",", 1)
        stderr = row.get(f"{metric}_stderr,{filter_name}")
        label = metric if filter_name == "none" else key
        metrics[label] = Metric(
            value=float(value),
            stderr=float(stderr) if isinstance(stderr, (int, float)) else None,
            higher_is_better=directions.get(metric),
        )
    return metrics


def extract_metrics(results: dict[str, Any], task_names: list[str]) -> dict[str, dict[str, Metric]]:
    """``{task: {metric: Metric}}`` for each requested name; a group without its own row gives its tasks' rows.

    A tag has neither a row nor a `group_subtasks` entry: pass its own slice (`task_slice`
    with `tagged`), whose rows are then all its tasks'."""
    rows = results.get("results", {})
    out: dict[str, dict[str, Metric]] = {}
    for name in task_names:
        if name in rows:
            names = [name]
        elif name in results.get("group_subtasks", {}):
            names = [n for n in _members(results, name)[1:] if n in rows]
        else:
            names = list(rows)
        for row_name in names:
            directions = results.get("higher_is_better", {}).get(row_name, {})
            out[row_name] = _parse_row(rows[row_name], directions, results.get("configs", {}).get(row_name))
    return out


# ---------------------------------------------------------------- running

@dataclass
class BuiltTasks:
    objects: list[Any]  # lm-eval Task and Group objects, ready for simple_evaluate
    tagged: dict[str, list[str]]  # tag → the tasks it names (lm-eval's results do not mention tags)
    leaves: dict[str, Any] = field(default_factory=dict)  # every Task object, groups opened: name → Task


def build_tasks(names: list[str], manager: Any) -> BuiltTasks:
    """lm-eval's Task and Group objects for `names`, each built once (which reads its dataset).

    Built one name at a time before any scoring, so a dataset that cannot be read, such as a
    Hub set that is not cached on an offline machine, is one line (exit 2) naming the task
    rather than a traceback from inside lm-eval; the built objects then go to
    `simple_evaluate` as they are, so no task is built (and no dataset read) twice."""
    built = BuiltTasks([], {})
    for name in names:
        try:
            loaded = manager.load([name])
        except Exception as err:  # datasets raises many types: connection, missing files, bad configs
            raise TaskError(f"task '{name}' cannot load its data: {type(err).__name__}: {first_line(err)}", where="--tasks") from None
        built.leaves.update(loaded["tasks"])
        if name in loaded["groups"]:
            built.objects.append(loaded["groups"][name])
        elif name in loaded["tasks"]:
            built.objects.append(loaded["tasks"][name])
        else:  # a tag: the tasks it names
            built.objects.extend(loaded["tasks"].values())
            built.tagged[name] = list(loaded["tasks"])
    return built


def check_unsafe_code(built: BuiltTasks, confirmed: bool) -> None:
    """lm-eval refuses a task marked `unsafe_code` (it runs model-written code) without
    confirmation, but only once the model is loaded; refuse it here, before."""
    if confirmed:
        return
    for name, task in built.leaves.items():
        if getattr(task, "UNSAFE_CODE", False):
            raise TaskError(
                f"task '{name}' runs code the model writes; pass --confirm-run-unsafe-code (in a recipe,"
                " evaluate.confirm_run_unsafe_code: true) if you accept that", where="--tasks",
            )


@dataclass
class PreparedTasks:
    """Tasks built (their data read) and checked before any model loads, for one lm-eval run.

    lm-eval's Task objects hold the requests of the run that scores them, so `take` hands them
    out once; a later run builds its own."""

    catalog: TaskCatalog
    tasks: tuple[ResolvedTask, ...]
    manager: Any  # lm-eval's TaskManager over these tasks' folders
    built: BuiltTasks | None  # None once taken

    def take(self, names: list[str]) -> tuple[Any, BuiltTasks] | None:
        """(manager, built tasks) when they are exactly `names` and not yet taken."""
        if self.built is None or [t.name for t in self.tasks] != names:
            return None
        built, self.built = self.built, None
        return self.manager, built


def prepare_tasks(catalog: TaskCatalog, tasks: list[ResolvedTask], confirm_run_unsafe_code: bool) -> PreparedTasks:
    """Build `tasks` (TaskError naming one whose data cannot be read) and refuse one that runs
    model-written code without confirmation (`check_unsafe_code`)."""
    manager = catalog.task_manager(tasks)
    built = build_tasks([t.name for t in tasks], manager)
    check_unsafe_code(built, confirm_run_unsafe_code)
    return PreparedTasks(catalog, tuple(tasks), manager, built)


@dataclass
class LmEvalRun:
    results: dict[str, Any]  # lm-eval's results JSON, without its samples
    samples: dict[str, list[dict[str, Any]]] | None  # per task, with --log-samples


def run_lm_eval(lm: Any, built: BuiltTasks, manager: Any, settings: EvalSettings) -> LmEvalRun:
    """lm-eval's results (and samples) for tasks `build_tasks` built with `manager`."""
    import lm_eval

    with quiet_git_hash_lookup(), in_process_bootstrap(), lm_eval_bars_hidden(not settings.show_progress):
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=built.objects,
            batch_size=settings.batch_size,  # only recorded in results["config"]: lm is built already
            max_batch_size=settings.max_batch_size,
            num_fewshot=settings.num_fewshot,
            limit=settings.limit,
            task_manager=manager,
            bootstrap_iters=1000,
            **settings.options.simple_evaluate_kwargs(),
        )
    if results is None:  # only on non-zero ranks of a distributed run
        raise RuntimeError("lm-eval returned no results")
    samples = results.pop("samples", None)
    return LmEvalRun(json_safe(results), samples)


@dataclass
class TargetResults:
    results: dict[str, Any]  # lm-eval's results JSON (merged over cached and fresh tasks)
    metrics: dict[str, dict[str, Metric]]  # extract_metrics of each requested task's own slice
    cached: list[str]  # tasks served from the cache
    tokens_per_second: float | None  # scoring throughput of the fresh run, where measured
    samples: dict[str, list[dict[str, Any]]] | None = None  # lm-eval's per-sample records, with --log-samples
    batch_ceiling: BatchCeiling | None = None  # of the fresh run; None when every task came from the cache


def _throughput(lm: Any) -> float | None:
    seconds = getattr(lm, "forward_seconds", 0.0)
    return getattr(lm, "forward_tokens", 0) / seconds if seconds > 0 else None


def evaluate_target(
    target: EvalTarget,
    settings: EvalSettings,
    catalog: TaskCatalog,
    cache: ResultsCache | None = None,
    echo: Callable[[str], None] = print,
    prepared: PreparedTasks | None = None,
) -> TargetResults:
    """lm-eval's results for `target` on every task in `settings`; `prepared`: those tasks built
    and checked already, used when this run scores all of them and no run has taken them yet."""
    slices: dict[str, dict[str, Any]] = {}
    keys: dict[str, CacheKey] = {}
    header: dict[str, Any] = {"lm_eval_version": lm_eval_version()}
    template_sha = hashlib.sha256(target.chat_template.encode()).hexdigest() if target.chat_template is not None else None
    # A seed left unset (`--seed None`) draws differently each run: such results are not reused.
    cacheable = (
        target.identity is not None
        and (not settings.options.apply_chat_template or template_sha is not None)
        and None not in settings.options.seeds
    )
    if cache is not None and cacheable:
        # Batch size and the auto search's ceiling are not in the key: they change how the requests
        # are grouped (speed, and float rounding at most), not what is scored.
        for task in settings.tasks:
            keys[task.name] = CacheKey(
                target.identity, task.name, task.fingerprint(), settings.limit, settings.num_fewshot, lm_eval_version(),
                settings.backend, settings.options.results_key(), template_sha,
            )
            # --log-samples needs lm-eval's per-sample records, which the cache does not keep: run, then store.
            hit = None if settings.options.log_samples else cache.get(keys[task.name])
            if hit is not None and hit.results.get("results"):  # older versions cached a tag as an empty slice
                slices[task.name] = hit.results
                header.update(hit.header)  # replaced below by a fresh run's own header, if one runs
    cached = [t.name for t in settings.tasks if t.name in slices]
    missing = [t.name for t in settings.tasks if t.name not in slices]
    if cached:
        echo(f"{target.name}: {', '.join(cached)} from the results cache")
        header["compressor_cached_tasks"] = cached
    throughput = None
    samples = None
    ceiling = None
    if missing:
        shots = "" if settings.num_fewshot is None else f", {settings.num_fewshot}-shot"
        chat = ", chat template" if settings.options.apply_chat_template else ""
        echo(f"{target.name}: running {', '.join(missing)} (limit {settings.limit or 'none'}{shots}{chat}, backend {settings.backend})")
        ready = prepared.take(missing) if prepared is not None else None
        if ready is None:  # built before the model loads: a task whose data is missing costs no load
            tasks = [t for t in settings.tasks if t.name in missing]
            ready = prepare_tasks(catalog, tasks, settings.options.confirm_run_unsafe_code).take(missing)
        assert ready is not None  # a fresh PreparedTasks of exactly `missing` is always there to take
        manager, built = ready
        lm = backend(settings.backend).build(target, settings)
        run = run_lm_eval(lm, built, manager, settings)
        fresh, samples = run.results, run.samples
        throughput = _throughput(lm)
        ceiling = getattr(lm, "batch_ceiling", NO_SEARCH)
        run_header = {k: v for k, v in fresh.items() if k not in (*PER_TASK_SECTIONS, "group_subtasks")}
        header.update(run_header)
        for name in missing:
            slices[name] = task_slice(fresh, name, built.tagged.get(name))
            if name in keys and cache is not None:
                cache.put(keys[name], slices[name], run_header)
    merged = merge_slices([slices[t.name] for t in settings.tasks], header)
    name_model(merged, target.reference)
    metrics = {row: values for t in settings.tasks for row, values in extract_metrics(slices[t.name], [t.name]).items()}
    return TargetResults(merged, metrics, cached, throughput, samples, ceiling)
