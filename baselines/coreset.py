#!/usr/bin/env python
"""Coreset baselines: real images as the "synthetic" set, in the harness file format.

``random``: IPC random real images per class (the "random real" row of distillation tables).
The set is written as ``OUT/synthetic.pt`` + ``OUT/grid.png``, so ``baselines/evaluate.py``
evaluates it exactly like a distilled set.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

METHODS = ("random",)


def build_parser() -> argparse.ArgumentParser:
    from baselines.harness.validation import OneLineParser
    p = OneLineParser(prog="baselines/coreset.py", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", choices=METHODS, default="random", help="coreset selection")
    p.add_argument("--dataset", default="digits", help="any harness dataset name")
    p.add_argument("--data-path", default="data", help="where downloadable datasets live")
    p.add_argument("--ipc", type=int, default=10, help="images per class")
    p.add_argument("--seed", type=int, default=0, help="selection seed")
    p.add_argument("--out", required=True, help="output directory (synthetic.pt, grid.png)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the synthetic set of an existing --out (never done otherwise)")
    return p


def _check_out(out: str, overwrite: bool) -> None:
    """Never overwrite a run: refuse an --out that is a file or already holds a synthetic set or
    a distillation run, unless --overwrite (which replaces only a coreset's own files)."""
    from baselines.harness.common import UsageError
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out} is a file; give a directory")
    if (path / "config.json").exists():
        raise UsageError(f"--out {out} holds a distillation run (config.json); choose another "
                         f"--out")
    if (path / "synthetic.pt").exists() and not overwrite:
        raise UsageError(f"--out {out} already holds a synthetic set; choose another --out or "
                         f"pass --overwrite to replace it")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from baselines.harness.common import check_ipc, initial_synthetic, save_synthetic
    from baselines.harness.datasets import canonical_dataset_name, load_dataset
    from baselines.harness.errors import USER_ERRORS
    from baselines.harness.runs import RunDir
    try:
        _check_out(args.out, args.overwrite)
        args.dataset = canonical_dataset_name(args.dataset)
        dataset = load_dataset(args.dataset, args.data_path)
        check_ipc(dataset, args.ipc, 1, "real")
        stored = initial_synthetic(dataset, args.ipc, 1, "real", args.seed)
        os.makedirs(args.out, exist_ok=True)
        config = {"method": args.method, "dataset": dataset.name, "ipc": args.ipc,
                  "seed": args.seed}
        save_synthetic(RunDir(args.out), dataset, stored, ipc=args.ipc, factor=1,
                       method=f"coreset-{args.method}", plugins=[], config=config, seed=args.seed)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {os.path.join(args.out, 'synthetic.pt')} ({args.ipc} random real images per "
          f"class of {dataset.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
