"""`compress densify SRC DST`: rewrite a sparse-bitmask checkpoint with dense weights, for
loaders that do not know the layout (plain transformers)."""

from __future__ import annotations

import argparse
from pathlib import Path

from compressor.checkpoint import check_output_dir
from compressor.output_lock import output_lock


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="compress densify", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a checkpoint folder written with prune storage: sparse")
    parser.add_argument("destination", type=Path, help="an empty or new folder")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    from compressor.sparse_format import densify_folder

    check_output_dir(args.destination, args.overwrite, inputs=[args.source])
    with output_lock(args.destination):
        layers = densify_folder(args.source, args.destination)
    print(f"densified {len(layers)} layers: {args.destination}")
    return 0
