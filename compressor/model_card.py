"""The model card (README.md) of a compressed checkpoint, built with huggingface_hub's ModelCard.

Everything comes from the output folder itself: `compression.json` (source, stages, sizes,
held-out perplexity, the `compress` command), `recipe.yaml`, `config.json`, the safetensors
headers, and `eval/report.json` with `eval/accuracy_vs_size.png` when an evaluation ran.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from compressor.card_facts import (
    base_model_relation,
    base_models,
    merge_hub_ids,
    merge_parents,
    source_license,
    weight_scheme_tags,
)
from compressor.evaluation.size import SizeInfo, measure_checkpoint
from compressor.moe_plain_loading import saved_checkpoint_note

EVAL_DIR = "eval"
EVAL_PLOT = "accuracy_vs_size.png"


@dataclass(frozen=True)
class CheckpointFacts:
    """What the card says, read from an output folder."""

    compression: dict[str, Any]
    recipe_text: str
    recipe: dict[str, Any]
    config: dict[str, Any]
    size: SizeInfo
    eval_report: dict[str, Any] | None
    has_eval_plot: bool
    out_dir: Path | None = None  # the folder the facts were read from (its weights' headers are read too)

    @property
    def stages(self) -> list[tuple[str, str]]:
        """(kind, method) of each stage that ran, from compression.json or else the recipe."""
        logged = self.compression.get("stages") or []
        if logged:
            pairs = [(str(s.get("kind")), str(s.get("method", ""))) for s in logged]
            merge = self.compression.get("merge")
            if merge and all(kind != "merge" for kind, _ in pairs):
                # Folders written before the merge was logged as a stage still record it here.
                pairs.insert(0, ("merge", str(merge.get("method", ""))))
            return pairs
        pairs = []
        for stage in self.recipe.get("stages") or []:
            ((kind, body),) = stage.items()
            pairs.append((kind, str((body or {}).get("method", ""))))
        return pairs


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def read_facts(out_dir: Path, eval_dir: Path | None = None) -> CheckpointFacts:
    """Gather the card's facts from `out_dir` (its `eval/` folder, or `eval_dir` if given)."""
    eval_dir = eval_dir or out_dir / EVAL_DIR
    recipe_path = out_dir / "recipe.yaml"
    recipe_text = recipe_path.read_text(encoding="utf-8") if recipe_path.is_file() else ""
    report_path = eval_dir / "report.json"
    return CheckpointFacts(
        compression=_read_json(out_dir / "compression.json"),
        recipe_text=recipe_text,
        recipe=yaml.safe_load(recipe_text) or {} if recipe_text else {},
        config=_read_json(out_dir / "config.json"),
        size=measure_checkpoint(out_dir),
        eval_report=_read_json(report_path) if report_path.is_file() else None,
        has_eval_plot=(eval_dir / EVAL_PLOT).is_file(),
        out_dir=out_dir,
    )


def card_metadata(facts: CheckpointFacts, base_model_override: list[str] | None = None) -> dict[str, Any]:
    """The YAML header: base_model, base_model_relation, library_name, license, tags."""
    bases = base_model_override or base_models(facts.compression, facts.recipe)
    methods = [method for _, method in facts.stages if method]
    tags = ["compressed-tensors", "compressor"] if _stored_compressed(facts) else ["compressor"]
    for tag in weight_scheme_tags(facts.config) + methods + [kind for kind, _ in facts.stages]:
        if tag not in tags:
            tags.append(tag)
    metadata: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": tags,
    }
    if bases:
        metadata["base_model"] = bases[0] if len(bases) == 1 else bases
        metadata["base_model_relation"] = base_model_relation(facts.stages)
    license_id = facts.config.get("license") or source_license(facts.compression.get("source") or {}, bases)
    if license_id:
        metadata["license"] = license_id
    return metadata


def _mb(n: int | float | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:,.1f} MB"


def _size_section(facts: CheckpointFacts) -> list[str]:
    size = facts.size
    original = (facts.compression.get("sizes") or {}).get("original_bytes")
    lines = ["## Size", "", "| | weights on disk | bits per parameter |", "|---|---:|---:|"]
    gguf = (facts.compression.get("sizes") or {}).get("original_gguf_bytes")
    if original:
        label = "original, as loaded (dequantized from GGUF)" if gguf else "original"
        lines.append(f"| {label} | {_mb(original)} | {8 * original / max(size.parameters, 1):.2f} |")
    if gguf:
        lines.append(f"| original GGUF file | {_mb(gguf)} | {8 * gguf / max(size.parameters, 1):.2f} |")
    lines.append(f"| compressed | {_mb(size.size_bytes)} | {size.bits_per_parameter:.2f} |")
    lines.append("")
    facts_line = f"{size.parameters:,} parameters"
    if size.compressed_layers and size.bits_per_weight is not None:
        facts_line += (
            f"; the {size.compressed_weights:,} weights of the compressed layers take"
            f" {size.bits_per_weight:.2f} bits each (scales, zero points and masks included)"
        )
    if original:
        facts_line += f"; {original / max(size.size_bytes, 1):.2f}x smaller than the original"
    return [*lines, facts_line + ".", ""]


def _metric_cell(entry: dict[str, Any], is_base: bool) -> str:
    value = entry.get("value")
    if value is None:
        return "n/a"
    cell = f"{value:.4g}"
    if entry.get("stderr") is not None:
        cell += f" ± {entry['stderr']:.2g}"
    if not is_base and entry.get("recovery") is not None:
        cell += f" ({100 * entry['recovery']:.1f}%)"
    return cell


def _eval_section(facts: CheckpointFacts) -> list[str]:
    report = facts.eval_report
    lines: list[str] = []
    if report and report.get("models"):
        columns: list[tuple[str, str]] = []
        for model in report["models"]:
            for task, metrics in (model.get("metrics") or {}).items():
                columns.extend((task, m) for m in metrics if (task, m) not in columns)
        header = "| model | size | bits/weight | " + " | ".join(f"{t}: {m}" for t, m in columns) + " |"
        lines += ["## Evaluation", "", header, "|" + "---|" * 3 + "---:|" * len(columns)]
        for model in report["models"]:
            is_base = model.get("name") == report.get("base")
            bits = model.get("bits_per_weight")
            cells = [
                str(model.get("name")),
                _mb(model.get("size_bytes")),
                "n/a" if bits is None else f"{bits:.2f}",
                *(
                    _metric_cell(((model.get("metrics") or {}).get(t) or {}).get(m) or {}, is_base)
                    for t, m in columns
                ),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        limit = report.get("limit")
        lines += [
            "",
            f"lm-eval {report.get('lm_eval_version', '?')}"
            + (f", at most {limit} samples per task" if limit else "")
            + "; in parentheses, the score relative to the base model"
            f" (`{report.get('base')}`; 100% = no loss, whichever direction is better).",
            "",
        ]
        if facts.has_eval_plot:
            lines += [f"![accuracy versus size]({EVAL_DIR}/{EVAL_PLOT})", ""]
    perplexity = facts.compression.get("perplexity") or {}
    if perplexity.get("base") is not None and perplexity.get("compressed") is not None:
        change = (perplexity["compressed"] / perplexity["base"] - 1) * 100
        lines += [
            "## Held-out perplexity" if lines else "## Evaluation",
            "",
            f"Perplexity on {perplexity.get('tokens', 0):,} tokens of the {perplexity.get('slice', 'held-out text')}"
            f" (windows of {perplexity.get('seq_len')} tokens): **{perplexity['compressed']:.3f}**,"
            f" against {perplexity['base']:.3f} for the original ({change:+.1f}%).",
            "",
        ]
    return lines


def _stored_compressed(facts: CheckpointFacts) -> bool:
    """Whether the weights are stored in a compressed format (a merge or a distillation alone writes
    plain dense weights, which need neither compressed-tensors nor its kernels)."""
    return bool(facts.config.get("quantization_config") or facts.config.get("sparsity_config"))


def _usage_section(repo_id: str, facts: CheckpointFacts) -> list[str]:
    asymmetric = any(
        not ((group.get("weights") or {}).get("symmetric", True))
        for group in ((facts.config.get("quantization_config") or {}).get("config_groups") or {}).values()
    )
    compressed = _stored_compressed(facts)
    lines = [
        "## Use it",
        "",
        "With transformers (needs `pip install compressed-tensors`):" if compressed else "With transformers:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        "```",
        "",
        "With vLLM, which runs the compressed-tensors format with its own kernels:" if compressed else "With vLLM:",
        "",
        "```python",
        "from vllm import LLM",
        "",
        f'llm = LLM(model="{repo_id}")',
        'print(llm.generate("The capital of France is")[0].outputs[0].text)',
        "```",
        "",
        f"or as a server: `vllm serve {repo_id}`.",
        "",
    ]
    moe_note = saved_checkpoint_note(facts.out_dir, facts.config.get("quantization_config")) if facts.out_dir else None
    if moe_note:
        lines += [moe_note.format(repo_id=repo_id), ""]
    if asymmetric:
        lines += [
            "This checkpoint uses asymmetric (zero-point) weights: vLLM loads it; plain transformers 5.23 or newer"
            " with compressed-tensors 0.20 cannot yet (an upstream limitation of its zero-point loader), 5.21 and 5.22 do.",
            "",
        ]
    return lines


def _provenance_section(facts: CheckpointFacts) -> list[str]:
    command = facts.compression.get("command")
    versions = facts.compression.get("versions") or {}
    lines = ["## How it was made", ""]
    if command:
        lines += ["```bash", command, "```", ""]
    if facts.recipe_text:
        lines += ["with this recipe (`recipe.yaml` in this repository, defaults filled in):", "", "```yaml",
                  facts.recipe_text.rstrip(), "```", ""]  # fmt: skip
    if versions:
        lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) + ".", ""]
    return lines


def _hub_link(hub_id: str) -> str:
    return f"[{hub_id}](https://huggingface.co/{hub_id})"


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _merge_origin(merge: dict[str, Any]) -> str:
    """`a ties merge of [org/a](...) and `/local/b` (base)`: every input, Hub ones linked."""
    inputs = merge_parents(merge)
    words = []
    for entry in inputs:
        hub_id = (merge_hub_ids({"models": [entry]}) or [None])[0]
        word = _hub_link(hub_id) if hub_id else f"`{entry.get('model')}`"
        words.append(word + (" (base)" if entry.get("model") == merge.get("base") else ""))
    return f"a {merge.get('method')} merge of {_and(words) if words else 'models'}"


def _intro(repo_id: str, facts: CheckpointFacts, bases: list[str]) -> list[str]:
    recipe_name = (facts.compression.get("recipe") or {}).get("name") or facts.recipe.get("name", "?")
    stages = ", then ".join(f"{kind} ({method})" if method else kind for kind, method in facts.stages) or "no stage"
    merge = facts.compression.get("merge")
    if merge:
        compressed = any(kind != "merge" for kind, _ in facts.stages)
        origin = _merge_origin(merge)
        head = f"A compressed version of {origin}" if compressed else "A" + origin[1:]
    else:
        head = "A compressed version of " + (_and([_hub_link(b) for b in bases]) if bases else "a local model")
    description = facts.recipe.get("description")
    lines = [
        f"# {repo_id.rsplit('/', 1)[-1]}",
        "",
        f"{head}, made with the `compressor` recipe `{recipe_name}`: {stages}.",
    ]
    if description:
        lines += ["", f"> {description}"]
    return [*lines, ""]


def build_model_card(
    out_dir: Path,
    repo_id: str | None = None,
    *,
    base_model: list[str] | None = None,
    eval_dir: Path | None = None,
    local_name: str | None = None,
):
    """The ModelCard for the checkpoint in `out_dir`, to be published as `repo_id`.

    Without a repo id (the card written next to a local checkpoint), the snippets load
    the folder by its path, `./<local_name or the folder's name>`.
    """
    from huggingface_hub import ModelCard, ModelCardData

    facts = read_facts(out_dir, eval_dir)
    metadata = card_metadata(facts, base_model)
    bases = metadata.get("base_model") or []
    bases = [bases] if isinstance(bases, str) else list(bases)
    name = repo_id or f"./{local_name or out_dir.name}"
    body = [
        *_intro(name, facts, bases),
        *_size_section(facts),
        *_eval_section(facts),
        *_usage_section(name, facts),
        *_provenance_section(facts),
    ]
    data = ModelCardData(**metadata)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
