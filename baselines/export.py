#!/usr/bin/env python
"""Export a synthetic set for other tools: ``python baselines/export.py RUN --to FORMAT``.

``RUN`` is a run directory (or its ``synthetic.pt``). The stored images are decoded first (the
factorisation undone, so the export holds the images a network trains on), then written as
``imagefolder`` (8-bit PNGs in ``<class index>_<class name>`` folders, what DD-Ranking and
torchvision's ``ImageFolder`` read), ``tensor`` (``images.pt`` normalised with the dataset's
mean/std, ``labels.pt``) or ``dm`` (the original DM code's ``res_DM_<DATASET>_ConvNet_<ipc>ipc.pt``,
``{"data": [[images, labels]]}`` with normalised images). ``OUT/export.json`` states the format,
the mean/std and the space of the images. ``--out`` defaults to ``RUN/export-<format>``; a
non-empty ``--out`` is refused. ``--stats ddranking`` normalises with the statistics DD-Ranking
evaluates the run's dataset with instead (``ddranking:NAME`` for a run on a subset of
DD-Ranking's dataset NAME kept as an image folder; docs/ddranking.md); a dataset DD-Ranking does
not have is refused. The other way, ``baselines/evaluate.py`` evaluates an
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
from baselines.harness.exchange import (FORMATS, class_names_of, ddranking_stats,  # noqa: E402
                                       export)
from baselines.harness.factorization import decode  # noqa: E402
from baselines.harness.synset import SynSetError, load_synset  # noqa: E402
from baselines.harness.validation import OneLineParser  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="baselines/export.py", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a run directory or its synthetic.pt")
    p.add_argument("--to", choices=FORMATS, required=True, help="the format to write")
    p.add_argument("--out", default=None, help="where to write (default RUN/export-<format>)")
    p.add_argument("--stats", default="run", metavar="run|ddranking[:NAME]",
                   help="the mean/std the images are normalised with and export.json records: "
                        "run (the run's dataset's, the default) or ddranking (those DD-Ranking "
                        "normalises the run's dataset with; ddranking:NAME, e.g. "
                        "ddranking:CIFAR10, for a run on a subset of DD-Ranking's NAME)")
    return p


def stats_for(spec: str, synset) -> tuple[tuple, tuple, dict]:
    """``--stats``: the (mean, std) to normalise with and what export.json adds; UsageError
    (one line) for a bad value or a dataset DD-Ranking does not have."""
    meta = synset.meta
    if spec == "run":
        return meta["mean"], meta["std"], {"stats": "run"}
    kind, colon, name = spec.partition(":")
    if kind != "ddranking" or (colon and not name):
        raise UsageError(f"--stats {spec!r}: use run, ddranking or ddranking:NAME")
    try:
        ddr, mean, std = ddranking_stats(meta["dataset"], name or None,
                                         channels=int(synset.images.shape[1]),
                                         num_classes=synset.num_classes)
    except ValueError as exc:
        raise UsageError(f"--stats {spec}: {exc}") from None
    return mean, std, {"stats": "ddranking", "ddranking_dataset": ddr,
                       "run_mean": list(meta["mean"]), "run_std": list(meta["std"])}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from baselines.harness.paths import check_new_run_dir
    try:
        source = Path(args.run)
        path = source / "synthetic.pt" if source.is_dir() else source
        synset = load_synset(path)
        mean, std, recorded = stats_for(args.stats, synset)
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
    record = export(pixels, labels, out, args.to, dataset=meta["dataset"], mean=mean, std=std,
                    class_names=class_names_of(meta, synset.num_classes), ipc=meta.get("ipc"),
                    source=str(path.resolve()), extra=recorded)
    print(f"wrote {record['images']} decoded images ({args.to}, {record['space']}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
