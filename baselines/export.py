#!/usr/bin/env python
"""Export a synthetic set for other tools: ``python baselines/export.py RUN --to FORMAT``.

``RUN`` is a run directory (or its ``synthetic.pt``). The stored images are decoded first (the
factorisation undone, so the export holds the images a network trains on), then written as
``imagefolder`` (8-bit PNGs per class folder, what DD-Ranking and torchvision's ``ImageFolder``
read), ``tensor`` (``images.pt`` normalised with the dataset's mean/std, ``labels.pt``:
DD-Ranking's tensor input) or ``dm`` (the original DM code's ``res_DM_<DATASET>_ConvNet_<ipc>ipc.pt``,
``{"data": [[images, labels]]}`` with normalised images). ``OUT/export.json`` states the format,
the mean/std and the space of the images. ``--out`` defaults to ``RUN/export-<format>``; a
non-empty ``--out`` is refused. The other way, ``baselines/evaluate.py`` evaluates an
ImageFolder or a DM ``res_*.pt`` directly (with ``--dataset``).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from baselines.harness.common import UsageError  # noqa: E402
from baselines.harness.exchange import FORMATS, export  # noqa: E402
from baselines.harness.factorization import decode  # noqa: E402
from baselines.harness.synset import SynSetError, load_synset  # noqa: E402
from baselines.harness.validation import OneLineParser  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="baselines/export.py", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a run directory or its synthetic.pt")
    p.add_argument("--to", choices=FORMATS, required=True, help="the format to write")
    p.add_argument("--out", default=None, help="where to write (default RUN/export-<format>)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from baselines.harness.paths import check_new_run_dir
    try:
        source = Path(args.run)
        path = source / "synthetic.pt" if source.is_dir() else source
        synset = load_synset(path)
        out = Path(args.out) if args.out else path.parent / f"export-{args.to}"
        check_new_run_dir("--out", out)   # new or empty, writable
        if (out / "config.json").exists():
            raise UsageError(f"--out {out} is a run directory; choose another")
    except (SynSetError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    meta = synset.meta
    factor = int(meta.get("factor") or 1)
    pixels, labels = decode(synset.images, synset.labels, factor) if factor > 1 else \
        (synset.images, synset.labels)
    record = export(pixels, labels, out, args.to, dataset=meta["dataset"], mean=meta["mean"],
                    std=meta["std"], ipc=meta.get("ipc"), source=str(path.resolve()))
    print(f"wrote {record['images']} decoded images ({args.to}, {record['space']}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
