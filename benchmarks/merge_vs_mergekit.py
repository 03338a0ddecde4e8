"""Every merge method, compressor against mergekit side by side: same inputs, same config.

    python benchmarks/merge_vs_mergekit.py [--skip-smol | --skip-tiny] [--methods ties,...] [--no-sort-variant]
        [--json benchmarks/out/merge.json]

Inputs: a tiny random Llama (float32) and SmolLM2-135M-Instruct (bf16), each with three
"fine-tunes" made by adding Gaussian noise (1 % of each tensor's std). For every method the same
mergekit YAML config runs through mergekit (its own venv, `benchmarks/setup_mergekit_venv.sh`,
driven by `benchmarks/mergekit_driver.py`) and through `compress merge` (this venv), each in a
fresh process that reports its wall time and peak RSS. Outputs are compared tensor by tensor:
deterministic methods by relative error ||ours - mergekit|| / ||mergekit|| (pass: ≤ 1e-5 on every
tensor); DARE (random masks) in distribution: the share of entries changed from the base and the
L1 norm of the change, per tensor (pass: share within 0.02, norm within 5 %, tensors ≥ 10k entries).
Peak RSS is reported above the process's RSS just before the merge (imports excluded) and
compared with one model's size on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
MERGEKIT_PYTHON = HERE / ".venv-mergekit" / "bin" / "python"
DARE = ("dare_ties", "dare_linear")
SORTING = ("ties", "breadcrumbs")  # magnitude cuts: equal magnitudes are ordered by `tie_break`


def rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run_ours(config: Path, out: Path, tie_break: str | None = None) -> None:
    """In a fresh process: `compress merge CONFIG -o OUT`, timed, with peak RSS."""
    import resource

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers  # noqa: F401  (imported before the baseline, as mergekit's driver does)

    from compressor.commands.merge import load_merge_config
    from compressor.merging.recipe_run import run_merge_recipe
    from compressor.pipeline import RunOptions

    recipe = load_merge_config(config)
    if tie_break is not None:  # not a mergekit key: set on the translated recipe
        from dataclasses import replace

        spec = recipe.stages[0]
        recipe = replace(recipe, stages=(replace(spec, config=spec.config.model_copy(update={"tie_break": tie_break})),))
    baseline = rss_bytes()
    started = time.perf_counter()
    run_merge_recipe(recipe, RunOptions(out_dir=out, overwrite=True, show_progress=False), echo=lambda _: None)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak, "baseline_rss_bytes": baseline}))


def perturbed_copy(source: Path, target: Path, seed: int, scale: float = 0.01) -> Path:
    if (target / "config.json").is_file():
        return target
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and not item.name.endswith(".safetensors"):
            shutil.copy2(item, target / item.name)
    generator = torch.Generator().manual_seed(seed)
    for file in sorted(source.glob("*.safetensors")):
        out = {}
        for name, tensor in load_file(str(file)).items():
            work = tensor.float()
            out[name] = (work + torch.randn(work.shape, generator=generator) * scale * work.std()).to(tensor.dtype)
        save_file(out, str(target / file.name), metadata={"format": "pt"})
    return target


def tiny_base(folder: Path, tokenizer_from: Path) -> Path:
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_from))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def smol_base() -> Path:
    for candidate in (Path("/tmp/smol"),):
        if (candidate / "model.safetensors").is_file():
            return candidate
    from compressor.model_io import prepare_source

    _, _, folder = prepare_source("builtin:smollm2-135m-instruct")
    assert folder is not None
    return folder


def configs(base: Path, ft: list[Path]) -> dict[str, str]:
    b, a, c, d = base, ft[0], ft[1], ft[2]
    return {
        "linear": f"merge_method: linear\nmodels:\n  - {{model: {a}, parameters: {{weight: 0.5}}}}\n"
        f"  - {{model: {c}, parameters: {{weight: 0.3}}}}\n  - {{model: {d}, parameters: {{weight: 0.2}}}}\n",
        "task_arithmetic": f"merge_method: task_arithmetic\nbase_model: {b}\nmodels:\n"
        f"  - {{model: {a}, parameters: {{weight: 0.7}}}}\n  - {{model: {c}, parameters: {{weight: [0.2, 0.6]}}}}\n"
        "parameters: {lambda: 0.9}\n",
        "ties": f"merge_method: ties\nbase_model: {b}\nmodels:\n  - {{model: {a}, parameters: {{weight: 0.6, density: 0.5}}}}\n"
        f"  - {{model: {c}, parameters: {{weight: [0.2, 0.8], density: 0.7}}}}\nparameters: {{normalize: true, int8_mask: true}}\n",
        "dare_ties": f"merge_method: dare_ties\nbase_model: {b}\nmodels:\n  - {{model: {a}, parameters: {{weight: 0.5, density: 0.5}}}}\n"
        f"  - {{model: {c}, parameters: {{weight: 0.5, density: 0.5}}}}\n",
        "dare_linear": f"merge_method: dare_linear\nbase_model: {b}\nmodels:\n  - {{model: {a}, parameters: {{weight: 0.6, density: 0.3}}}}\n"
        f"  - {{model: {c}, parameters: {{weight: 0.4, density: 0.6}}}}\n",
        "slerp": f"merge_method: slerp\nbase_model: {b}\nmodels:\n  - model: {b}\n  - model: {a}\nparameters:\n  t:\n"
        "    - {filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}\n    - {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}\n    - {value: 0.5}\n",
        "breadcrumbs": f"merge_method: breadcrumbs\nbase_model: {b}\nmodels:\n"
        f"  - {{model: {a}, parameters: {{weight: 0.5, density: 0.9, gamma: 0.01}}}}\n"
        f"  - {{model: {c}, parameters: {{weight: 0.5, density: 0.8, gamma: 0.02}}}}\n",
        "model_stock": f"merge_method: model_stock\nbase_model: {b}\nmodels:\n  - model: {a}\n  - model: {c}\n  - model: {d}\n",
    }


def tensors_of(folder: Path) -> dict[str, Path]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            out.update({name: file for name in handle.keys()})
    return out


def read(file: Path, name: str) -> torch.Tensor:
    with safe_open(str(file), "pt") as handle:
        return handle.get_tensor(name).double()


def compare(ours: Path, theirs: Path, base: Path, method: str) -> dict:
    mine, other, base_files = tensors_of(ours), tensors_of(theirs), tensors_of(base)
    common = sorted(set(mine) & set(other))
    report: dict = {"only_ours": sorted(set(mine) - set(other)), "only_mergekit": sorted(set(other) - set(mine))}
    if method in DARE:
        worst_share, worst_norm = 0.0, 0.0
        for name in common:
            a, b, w = read(mine[name], name), read(other[name], name), read(base_files[name], name)
            if a.numel() < 10_000:
                continue
            da, db = a - w, b - w
            worst_share = max(worst_share, abs((da != 0).double().mean().item() - (db != 0).double().mean().item()))
            worst_norm = max(worst_norm, abs(da.abs().sum().item() / max(db.abs().sum().item(), 1e-30) - 1))
        report.update(max_share_diff=worst_share, max_l1_rel_diff=worst_norm, passed=worst_share <= 0.02 and worst_norm <= 0.05)
    else:
        worst, worst_name, differing = 0.0, None, 0
        for name in common:
            a, b = read(mine[name], name), read(other[name], name)
            error = ((a - b).norm() / b.norm().clamp(min=1e-30)).item()
            differing += int((a != b).sum().item())
            if error > worst:
                worst, worst_name = error, name
        report.update(max_rel_error=worst, worst_tensor=worst_name, differing_elements=differing, passed=worst <= 1e-5)
    report["passed"] = report["passed"] and not report["only_ours"] and not report["only_mergekit"]
    return report


def run_process(command: list[str]) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench(label: str, base: Path, ft: list[Path], work: Path, methods: list[str], sort_variant: bool = True) -> list[dict]:
    rows = []
    model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    for method, text in configs(base, ft).items():
        if methods and method not in methods:
            continue
        folder = work / label / method
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        config = folder / "mergekit.yaml"
        config.write_text(text)
        theirs = run_process([str(MERGEKIT_PYTHON), str(HERE / "mergekit_driver.py"), str(config), str(folder / "mergekit")])
        ours = run_process([sys.executable, __file__, "--ours", str(config), str(folder / "ours")])
        theirs["rss_over_baseline"] = theirs["peak_rss_bytes"] - theirs["baseline_rss_bytes"]
        # TIES / Breadcrumbs also with `tie_break: sort` (mergekit's argsort order among equal magnitudes).
        for tie_break in (None, "sort") if method in SORTING and sort_variant else (None,):
            suffix = f"-{tie_break}" if tie_break else ""
            command = [sys.executable, __file__, "--ours", str(config), str(folder / f"ours{suffix}")]
            ours = run_process(command + (["--tie-break", tie_break] if tie_break else []))
            ours["rss_over_baseline"] = ours["peak_rss_bytes"] - ours["baseline_rss_bytes"]
            row = {"model": label, "method": method, "tie_break": tie_break or "index", "model_bytes": model_bytes,
                   "ours": ours, "mergekit": theirs,
                   "comparison": compare(folder / f"ours{suffix}", folder / "mergekit", base, method)}
            rows.append(row)
            c = row["comparison"]
            detail = (f"share {c['max_share_diff']:.4f} l1 {c['max_l1_rel_diff']:.4f}" if method in DARE
                      else f"max rel err {c['max_rel_error']:.2e} ({c['differing_elements']} differ)")
            name = method + (f" ({tie_break})" if tie_break else "")
            print(f"{label:6} {name:18} {'PASS' if c['passed'] else 'FAIL'} {detail:40} "
                  f"ours {ours['seconds']:6.2f}s {ours['rss_over_baseline'] / 1e6:7.1f} MB | "
                  f"mergekit {theirs['seconds']:6.2f}s {theirs['rss_over_baseline'] / 1e6:7.1f} MB "
                  f"(model {model_bytes / 1e6:.1f} MB)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ours", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--tie-break", choices=("index", "sort"), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=HERE / "out" / "merge")
    parser.add_argument("--skip-smol", action="store_true")
    parser.add_argument("--skip-tiny", action="store_true")
    parser.add_argument("--no-sort-variant", action="store_true", help="skip the tie_break: sort rows")
    parser.add_argument("--methods", default="", help="comma-separated subset")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.ours:
        run_ours(Path(args.ours[0]), Path(args.ours[1]), args.tie_break)
        return
    if not MERGEKIT_PYTHON.is_file():
        sys.exit("mergekit venv missing: bash benchmarks/setup_mergekit_venv.sh")
    methods = [m for m in args.methods.split(",") if m]
    smol = smol_base()
    inputs = args.work / "inputs"
    tiny = tiny_base(inputs / "tiny-base", smol)
    rows = [] if args.skip_tiny else bench(
        "tiny", tiny, [perturbed_copy(tiny, inputs / f"tiny-ft{i}", seed=i + 1) for i in range(3)], args.work, methods,
        not args.no_sort_variant,
    )
    if not args.skip_smol:
        smol_ft = [perturbed_copy(smol, inputs / f"smol-ft{i}", seed=i + 1) for i in range(3)]
        rows += bench("smol", smol, smol_ft, args.work, methods, not args.no_sort_variant)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
