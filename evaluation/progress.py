"""lm-eval's progress bars, on or off for one run (`compress eval -q`, `compress -q` with `evaluate:`).

lm-eval 0.4.13 draws its bars in three places:

- the model's request loops (HFLM's and VLLM's `loglikelihood` with its "Tokenizing inputs",
  `loglikelihood_rolling`, `generate_until`, and `_loglikelihood_tokens`' "Running loglikelihood
  requests"). Each takes `disable_tqdm`, which the evaluator never sets; `QuietableRequests` sets
  it on the model object. `loglikelihood_rolling` calls `_loglikelihood_tokens` with
  `disable_tqdm=False` whatever it was given, so that one is overridden too.
- `Task.build_all_requests` (one bar per task while it builds the prompts), and
- `bootstrap_stderr` in `lm_eval.api.metrics` (one bar per bootstrapped metric, such as lambada's
  perplexity), which have no switch at all. `lm_eval_bars_hidden` hides those two for the
  duration of `simple_evaluate` only: `lm_eval.api.task.tqdm` and the `tqdm.tqdm` that
  `bootstrap_stderr` imports when it runs are a class that is always disabled.

lm-eval also `print`s a few progress lines to stdout ("bootstrapping for stddev: perplexity",
"Passed argument batch_size = auto. Detecting largest batch size", "Determined Largest batch
size: N"); with the bars hidden, stdout is set aside for the same span (its warnings go through
logging, to stderr, and stay).
"""

from __future__ import annotations

import io
from contextlib import contextmanager, redirect_stdout
from typing import Any, Iterator


class QuietableRequests:
    """Mixed in before an lm-eval model class: with `show_progress` False its request loops draw no bar."""

    show_progress = True

    def _disable(self, disable_tqdm: bool) -> bool:
        return disable_tqdm or not self.show_progress

    def loglikelihood(self, requests: Any, disable_tqdm: bool = False) -> Any:
        return super().loglikelihood(requests, disable_tqdm=self._disable(disable_tqdm))  # type: ignore[misc]

    def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> Any:
        return super().loglikelihood_rolling(requests, disable_tqdm=self._disable(disable_tqdm))  # type: ignore[misc]

    def generate_until(self, requests: Any, disable_tqdm: bool = False) -> Any:
        return super().generate_until(requests, disable_tqdm=self._disable(disable_tqdm))  # type: ignore[misc]

    def _loglikelihood_tokens(self, requests: Any, disable_tqdm: bool = False, **kwargs: Any) -> Any:
        return super()._loglikelihood_tokens(requests, disable_tqdm=self._disable(disable_tqdm), **kwargs)  # type: ignore[misc]


def quietable(model_class: type) -> type:
    """`model_class` (HFLM, VLLM or a subclass) with `QuietableRequests` in front."""
    return type(f"Quietable{model_class.__name__}", (QuietableRequests, model_class), {})


@contextmanager
def lm_eval_bars_hidden(hidden: bool) -> Iterator[None]:
    """While inside, with `hidden`, lm-eval's task-building and bootstrap bars are not drawn and
    its progress prints are dropped."""
    if not hidden:
        yield
        return
    import lm_eval.api.task as task_module
    import tqdm as tqdm_package

    drawn = tqdm_package.tqdm

    class HiddenTqdm(drawn):  # a subclass, so tqdm.write and isinstance checks still work
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    swapped = [(task_module, getattr(task_module, "tqdm", None)), (tqdm_package, drawn)]
    for module, _ in swapped:
        module.tqdm = HiddenTqdm
    try:
        with redirect_stdout(io.StringIO()):
            yield
    finally:
        for module, original in swapped:
            if original is None:
                del module.tqdm
            else:
                module.tqdm = original
