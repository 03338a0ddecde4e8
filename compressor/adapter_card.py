"""The model card (README.md) of a LoRA adapter folder written by `compress finetune`.

Everything comes from the folder: `adapter_config.json` (peft's: rank, alpha, dropout, targets,
the base it was trained on), `training.json` (the options, the loss curve, the held-out loss)
and the safetensors header of the adapter weights. The YAML header is what the Hub expects of
an adapter: `library_name: peft`, `base_model` with `base_model_relation: adapter`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.card_facts import hub_id_of_reference, reference_license
from compressor.evaluation.size import SizeInfo, measure_checkpoint

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINING_LOG = "training.json"


@dataclass(frozen=True)
class AdapterFacts:
    config: dict[str, Any]  # adapter_config.json
    training: dict[str, Any]  # training.json ({} when absent)
    size: SizeInfo

    @property
    def options(self) -> dict[str, Any]:
        return self.training.get("options") or {}

    @property
    def base_reference(self) -> str | None:
        """What the adapter was trained on, as the user named it (else as peft recorded it)."""
        return self.options.get("model") or self.config.get("base_model_name_or_path")


def read_adapter_facts(folder: Path) -> AdapterFacts:
    training_path = folder / TRAINING_LOG
    return AdapterFacts(
        config=json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8")),
        training=json.loads(training_path.read_text(encoding="utf-8")) if training_path.is_file() else {},
        size=measure_checkpoint(folder),
    )


def adapter_base_models(facts: AdapterFacts, override: list[str] | None = None) -> list[str]:
    """The Hub id(s) of the base: --base-model, else the training reference or peft's record when
    either is a Hub id, a built-in with one, or a Hub cache snapshot."""
    if override:
        return list(override)
    for reference in (facts.options.get("model"), facts.config.get("base_model_name_or_path")):
        hub_id = hub_id_of_reference(reference)
        if hub_id:
            return [hub_id]
    return []


def adapter_metadata(facts: AdapterFacts, bases: list[str]) -> dict[str, Any]:
    tags = ["peft", "lora", "compressor"] + (["qlora"] if facts.options.get("qlora") else [])
    tags += [tag for tag, key in (("dora", "use_dora"), ("rslora", "use_rslora")) if facts.config.get(key)]
    metadata: dict[str, Any] = {"library_name": "peft", "pipeline_tag": "text-generation", "tags": tags}
    if bases:
        metadata["base_model"] = bases[0] if len(bases) == 1 else bases
        metadata["base_model_relation"] = "adapter"
    license_id = reference_license(facts.base_reference, bases)
    if license_id:
        metadata["license"] = license_id
    return metadata


def _targets(config: dict[str, Any]) -> str:
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        return f"`{targets}`"
    kinds = sorted({str(t).rsplit(".", 1)[-1] for t in targets})
    return f"{len(targets)} layers ({', '.join(kinds)})"


def _base_words(qlora: bool | None, quantization: str | None) -> str:
    if qlora:
        return "loaded in NF4 (QLoRA: bitsandbytes, double quantization, bf16 compute)"
    if quantization:
        return f"the {quantization} checkpoint as it is (packed weights frozen)"
    return "as loaded (no quantization)"


def _variant(config: dict[str, Any]) -> str:
    """The LoRA variant, from adapter_config.json (what peft will apply)."""
    words = []
    if config.get("use_dora"):
        words.append("DoRA (weight-decomposed: a trained magnitude per output; `use_dora`)")
    scaling = "alpha/√r (rank-stabilized, `use_rslora`)" if config.get("use_rslora") else "alpha/r"
    return "; ".join([*words, f"scaling {scaling}"])


def _optimization(options: dict[str, Any], training: dict[str, Any]) -> list[tuple[str, str]]:
    from compressor.training.optimizers import OPTIMIZERS

    optim = options.get("optim", "adamw_torch")
    accumulation = options.get("grad_accum", 1)
    batch = training.get("effective_batch_size", options.get("batch_size"))
    return [
        ("steps", f"{options.get('steps')} (effective batch {batch}: {options.get('batch_size')} × {accumulation} accumulated"
                  f" × {training.get('processes', 1)} processes; max length {options.get('max_length')})"),
        ("optimizer", f"{OPTIMIZERS[optim].words if optim in OPTIMIZERS else optim}, weight decay {options.get('weight_decay', 0.0)}"),
        ("learning rate", f"{options.get('lr')}, warm-up {training.get('warmup_steps', 0)} steps,"
                          f" {options.get('lr_scheduler', 'cosine')} schedule"),
    ]


def _training_rows(facts: AdapterFacts) -> list[str]:
    config, options, training = facts.config, facts.options, facts.training
    rows = [
        ("base", _base_words(options.get("qlora"), training.get("base_quantization"))),
        ("rank r / alpha / dropout", f"{config.get('r')} / {config.get('lora_alpha')} / {config.get('lora_dropout')}"),
        ("variant", _variant(config)),
        ("target modules", _targets(config)),
    ]
    if config.get("modules_to_save"):
        tied = " (input embedding and output head tied: one shared copy, `ensure_weight_tying`)" if config.get("ensure_weight_tying") else ""
        rows.append(("trained whole", f"{', '.join(f'`{m}`' for m in config['modules_to_save'])}{tied}"))
    if options:
        rows += [
            ("data", f"`{options.get('dataset')}`"),
            *_optimization(options, training),
            ("seed", str(options.get("seed"))),
        ]
        if training.get("packing"):
            packing = training["packing"]
            rows.append(("packing", f"{packing['examples']} examples in {packing['sequences']} sequences"
                                    f" ({packing['fill']:.0%} full, no attention across examples)"))
        if training.get("resumed_from"):
            rows.append(("resumed", f"after step {training['resumed_from']} (from a `--save-every` checkpoint)"))
    losses = training.get("losses") or []
    if losses:
        rows.append(("training loss", f"{losses[0]:.4f} (first step) → {losses[-1]:.4f} (last step)"))
    before, after = training.get("eval_loss_before"), training.get("eval_loss_after")
    if before is not None and after is not None:
        rows.append(("held-out loss", f"{before:.4f} → {after:.4f} (`{options.get('eval_dataset')}`)"))
    return ["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]


def _usage(name: str, bases: list[str], compressed_base: bool) -> list[str]:
    base = bases[0] if bases else "BASE_MODEL"
    lines = [
        "## Use it",
        "",
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        "",
        f'model = AutoPeftModelForCausalLM.from_pretrained("{name}")',
        "```",
        "",
        "or on a base you loaded yourself:",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base}")',
        f'model = PeftModel.from_pretrained(base, "{name}")',
        "```",
        "",
    ]
    if compressed_base:
        lines += [
            "The base is a compressed-tensors checkpoint: load it dequantized for peft, with"
            " `quantization_config=CompressedTensorsConfig(dequantize=True)` (from transformers).",
            "",
        ]
    lines += [f"With vLLM: `vllm serve {base} --enable-lora --lora-modules adapter={name}`.", ""]
    return lines


def build_adapter_card(folder: Path, repo_id: str | None = None, *, base_model: list[str] | None = None,
                       local_name: str | None = None):
    """The ModelCard of the adapter in `folder`, to be published as `repo_id`; without one the
    snippets load `./<local_name or the folder's name>`."""
    from huggingface_hub import ModelCard, ModelCardData

    facts = read_adapter_facts(folder)
    bases = adapter_base_models(facts, base_model)
    name = repo_id or f"./{local_name or folder.name}"
    base_words = ", ".join(f"[{b}](https://huggingface.co/{b})" for b in bases) or f"`{facts.base_reference}`"
    compressed_base = facts.training.get("base_quantization") == "compressed-tensors"
    body = [
        f"# {name.rsplit('/', 1)[-1]}",
        "",
        f"A LoRA adapter for {base_words}, trained with `compress finetune` (peft {facts.config.get('peft_version', '?')}).",
        "",
        "## Training",
        "",
        *_training_rows(facts),
        "",
        f"Adapter: {facts.size.parameters:,} parameters, {facts.size.size_bytes / 1e6:,.1f} MB.",
        "",
        *_usage(name, bases, compressed_base),
    ]
    data = ModelCardData(**adapter_metadata(facts, bases))
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def hub_adapter_config(folder: Path, bases: list[str]) -> bytes | None:
    """adapter_config.json as uploaded: `base_model_name_or_path` set to the Hub base, so that
    `AutoPeftModelForCausalLM.from_pretrained(repo)` finds it anywhere (the local file names the
    folder it was trained from). None when no single Hub base is known: upload the file as it is."""
    if len(bases) != 1:
        return None
    config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    if config.get("base_model_name_or_path") == bases[0]:
        return None
    config["base_model_name_or_path"] = bases[0]
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")
