"""Where our TIES output differs from mergekit's, is every differing entry one whose |delta| equals
a model's trim threshold (a tie broken differently: our lower-index-first against argsort's order)?

    python benchmarks/merge_ties_cut_check.py benchmarks/out/merge/smol/ties

Reads FOLDER/mergekit.yaml (base_model, models with density), FOLDER/ours and FOLDER/mergekit.
Prints, per tensor that differs, how many entries differ and whether all of them sit at a cut.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml
from safetensors import safe_open


def tensor(folder: Path, name: str) -> torch.Tensor:
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            if name in handle.keys():
                return handle.get_tensor(name)
    raise KeyError(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    config = yaml.safe_load((args.folder / "mergekit.yaml").read_text())
    base = Path(config["base_model"])
    models = [(Path(m["model"]), float(m["parameters"]["density"])) for m in config["models"]]
    ours, theirs = args.folder / "ours", args.folder / "mergekit"
    names = []
    for file in sorted(ours.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            names += list(handle.keys())
    report = {"tensors_differing": 0, "entries_differing": 0, "all_at_a_cut": True}
    for name in names:
        differ = tensor(ours, name) != tensor(theirs, name)
        if not differ.any():
            continue
        at_cut = torch.zeros_like(differ)
        reference = tensor(base, name)
        for model, density in models:
            magnitude = (tensor(model, name) - reference).abs().reshape(-1)  # the delta in the inputs' dtype
            keep = max(1, int(density * magnitude.numel()))
            threshold = torch.kthvalue(magnitude.float(), magnitude.numel() - keep + 1).values  # keep-th largest
            at_cut |= (magnitude.float() == threshold).reshape(differ.shape)
        inside = bool((differ <= at_cut).all())
        report["tensors_differing"] += 1
        report["entries_differing"] += int(differ.sum())
        report["all_at_a_cut"] &= inside
        print(f"{name}: {int(differ.sum())} entries differ, all at a cut magnitude: {inside} ({int(at_cut.sum())} entries at a cut)")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
