#!/usr/bin/env python
"""Build a per-class image-folder subset of a dataset, reproducibly from a seed.

Draws ``--train-per-class`` training and ``--test-per-class`` test images of every class of any
dataset the harness loads and writes them as ``OUT/train/<class>/NNNN.png`` and
``OUT/test/<class>/NNNN.png`` (or ``.jpg``), plus ``OUT/subset.json`` recording the source
dataset, the seed and the index of every chosen image in its split. The folder loads back with
``--dataset imagefolder:OUT`` (same class names, same counts).

The selection depends only on the dataset and the seed (an explicit ``torch.Generator``; the
global RNG is never touched), so the same command rebuilds the same subset. Pixels are written
as 8-bit values; PNG round-trips them exactly, JPEG (quality 95) approximately.

The images are first written to ``OUT.partial`` and the folder is renamed to ``OUT`` only when
everything is written, so an interrupted run never leaves a half-written ``OUT``. An existing,
non-empty ``OUT`` is never overwritten. An ``OUT`` in a place that cannot be written (a
read-only file system, no permission) is refused before the dataset is read, and a write that
fails on the way is one line naming the file (nothing is kept).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FORMATS = {"png": (".png", "PNG", {}), "jpg": (".jpg", "JPEG", {"quality": 95})}
MANIFEST = "subset.json"
SPLITS = ("train", "test")


class SubsetError(Exception):
    """A user error, reported as one line (exit status 2)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def build_parser() -> argparse.ArgumentParser:
    from baselines.harness.validation import OneLineParser
    p = OneLineParser(prog="baselines/make_subset.py", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="digits", help="any harness dataset name (see "
                   "baselines/harness/datasets.py), e.g. cifar10 or imagefolder:PATH")
    p.add_argument("--data-path", default="data", help="where downloadable datasets live")
    p.add_argument("--train-per-class", type=int, default=1000,
                   help="training images drawn from every class")
    p.add_argument("--test-per-class", type=int, default=200,
                   help="test images drawn from every class")
    p.add_argument("--seed", type=int, default=0, help="selection seed")
    p.add_argument("--format", choices=sorted(FORMATS), default="png",
                   help="image file format (png is lossless; jpg uses quality 95)")
    p.add_argument("--out", required=True,
                   help="output folder; must not exist or be empty (never overwritten)")
    return p


# ------------------------------------------------------------------------------------ checks

def partial_path(out: str) -> str:
    """Where the subset is written before it is renamed to ``out``."""
    return os.path.normpath(out) + ".partial"


def check_output(out: str) -> None:
    """Refuse an existing non-empty ``out`` or a leftover ``out.partial``."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise SubsetError(f"--out {out} exists and is not a folder; choose another path")
    if os.path.isdir(out) and os.listdir(out):
        raise SubsetError(f"--out {out} exists and is not empty; choose a new folder (an existing "
                          f"subset is never overwritten)")
    partial = partial_path(out)
    if os.path.lexists(partial):
        raise SubsetError(f"{partial} exists (left by an interrupted run, or another run is "
                          f"writing it); delete it and run again")
    base = os.path.dirname(os.path.abspath(partial))
    while not os.path.lexists(base) and base != os.path.dirname(base):
        base = os.path.dirname(base)   # the folder the subset's folders would be made in
    if not os.path.isdir(base):
        raise SubsetError(f"--out {out} is under {base}, a file; choose another path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise SubsetError(f"--out {out}: {base} is not writable (read-only file system or no "
                          f"permission); choose a folder you can write to")


def check_counts(train_per_class: int, test_per_class: int) -> None:
    for flag, k in (("--train-per-class", train_per_class), ("--test-per-class", test_per_class)):
        if k < 1:
            raise SubsetError(f"{flag} must be >= 1, got {k}")


def check_class_sizes(dataset, per_class: dict[str, int]) -> None:
    """Every class of each split must have at least the requested number of images."""
    for split, k in per_class.items():
        sizes = getattr(dataset, split).class_sizes()
        smallest = min(range(len(sizes)), key=lambda c: sizes[c])
        if k > sizes[smallest]:
            raise SubsetError(
                f"--{split}-per-class {k} is more than class {dataset.class_names[smallest]!r} "
                f"has in the {split} split of {dataset.name} ({sizes[smallest]} images; every "
                f"class needs {k}); ask for at most {sizes[smallest]}")


def folder_names(class_names: list[str]) -> list[str]:
    """A safe folder name per class: the class name, with path separators and a leading dot
    (hidden folders are skipped by the loader) replaced by ``_``. Names that would collide
    (also case-insensitively) are an error."""
    names = []
    for i, name in enumerate(class_names):
        safe = str(name).replace("/", "_").replace("\\", "_").replace("\0", "_").strip()
        if not safe or safe.startswith("."):
            safe = "_" + safe if safe else f"class_{i}"
        names.append(safe)
    seen: dict[str, int] = {}
    for i, safe in enumerate(names):
        j = seen.setdefault(safe.lower(), i)
        if j != i:
            raise SubsetError(f"classes {class_names[j]!r} and {class_names[i]!r} would share the "
                              f"folder name {safe!r}; this dataset cannot be written as a folder")
    return names


# ----------------------------------------------------------------------------------- building

def select_indices(dataset, per_class: dict[str, int], seed: int) -> dict[str, list[list[int]]]:
    """For each split, per class, the (sorted) indices into the split of the chosen images.

    One ``torch.Generator`` seeded with ``seed`` draws a permutation of every class of the
    training split in label order, then of the test split; each class keeps the first ``k`` of
    its permutation. The permutations do not depend on the counts, so with the same seed a
    smaller count picks a subset of what a larger one picks.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    chosen: dict[str, list[list[int]]] = {}
    for split in SPLITS:
        data = getattr(dataset, split)
        rows = []
        for c in range(dataset.num_classes):
            members = torch.nonzero(data.labels == c, as_tuple=True)[0]
            perm = torch.randperm(len(members), generator=generator)[:per_class[split]]
            rows.append(sorted(members[perm].tolist()))
        chosen[split] = rows
    return chosen


def to_uint8(dataset, images):
    """Normalised (N, C, H, W) -> uint8 (N, H, W, C) pixels, rounded to the nearest 8-bit value."""
    import torch

    pixels = dataset.denormalize(images.float()).clamp(0, 1).mul(255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().numpy()


def format_manifest(manifest: dict) -> str:
    """JSON with one top-level key per line and one class's index list per line."""
    lines = []
    for key, value in manifest.items():
        if key == "source_indices":
            splits = [f'  {json.dumps(split)}: [\n' + ",\n".join(
                f"   {json.dumps(row)}" for row in rows) + "\n  ]" for split, rows in value.items()]
            lines.append(f' {json.dumps(key)}: {{\n' + ",\n".join(splits) + "\n }")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def write_subset(dataset, out: str, chosen: dict[str, list[list[int]]], fmt: str,
                 manifest: dict) -> dict[str, int]:
    """Write the chosen images to ``out.partial`` and rename it to ``out``; returns the number of
    images written per split. On any failure the partial folder is removed again."""
    from PIL import Image

    if dataset.channels not in (1, 3):
        raise SubsetError(f"{dataset.name} has {dataset.channels}-channel images; only 1 (gray) "
                          f"and 3 (RGB) channels can be written as image files")
    ext, pil_format, options = FORMATS[fmt]
    folders = folder_names(dataset.class_names)
    partial = partial_path(out)
    parent = os.path.dirname(partial)
    if parent:
        os.makedirs(parent, exist_ok=True)
    os.mkdir(partial)  # fails if another run created it in the meantime
    written = {}
    try:
        for split in SPLITS:
            data = getattr(dataset, split)
            written[split] = 0
            for c, indices in enumerate(chosen[split]):
                folder = os.path.join(partial, split, folders[c])
                os.makedirs(folder)
                width = max(4, len(str(len(indices) - 1)))
                pixels = to_uint8(dataset, data.images[indices])
                for i, arr in enumerate(pixels):
                    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
                    img.save(os.path.join(folder, f"{i:0{width}d}{ext}"), format=pil_format,
                             **options)
                written[split] += len(indices)
        manifest = {**manifest, "folders": folders, "source_indices": chosen}
        with open(os.path.join(partial, MANIFEST), "w", encoding="utf-8") as f:
            f.write(format_manifest(manifest))
        if os.path.isdir(out):  # an empty folder (checked before): replace it
            os.rmdir(out)
        os.rename(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return written


def make_subset(dataset_name: str, out: str, *, data_path: str = "data",
                train_per_class: int = 1000, test_per_class: int = 200, seed: int = 0,
                fmt: str = "png") -> dict:
    """Build the subset (see the module docstring); returns the manifest written to
    ``OUT/subset.json`` plus ``"written"`` (images per split). Raises :class:`SubsetError` or
    the harness's ``DatasetError`` for user errors, before anything is written."""
    from baselines.harness.datasets import canonical_dataset_name, load_dataset

    if fmt not in FORMATS:
        raise SubsetError(f"--format must be one of {', '.join(sorted(FORMATS))}, got {fmt!r}")
    check_counts(train_per_class, test_per_class)
    check_output(out)
    dataset = load_dataset(canonical_dataset_name(dataset_name), data_path)
    per_class = {"train": train_per_class, "test": test_per_class}
    check_class_sizes(dataset, per_class)
    folder_names(dataset.class_names)  # collisions are an error before any work
    chosen = select_indices(dataset, per_class, seed)
    manifest = {"dataset": dataset.name, "seed": seed, "train_per_class": train_per_class,
                "test_per_class": test_per_class, "format": fmt,
                "class_names": list(dataset.class_names),
                "image_shape": [dataset.channels, dataset.image_size,
                                int(dataset.train.images.shape[3])],
                "selection": "torch.Generator().manual_seed(seed); per split (train, then test), "
                             "per class in label order: randperm(class size)[:per_class], "
                             "indices into the split, sorted"}
    written = write_subset(dataset, out, chosen, fmt, manifest)
    return {**manifest, "folders": folder_names(dataset.class_names), "written": written}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from baselines.harness.datasets import DatasetError
    try:
        info = make_subset(args.dataset, args.out, data_path=args.data_path,
                           train_per_class=args.train_per_class,
                           test_per_class=args.test_per_class, seed=args.seed, fmt=args.format)
    except (SubsetError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a write that failed on the way; write_subset removed the rest
        print(f"error: --out {args.out}: cannot write {exc.filename or 'a file'} "
              f"({exc.strerror or exc}); nothing was kept", file=sys.stderr)
        return 2
    names = info["class_names"]
    print(f"wrote {args.out}: {info['written']['train']} train + {info['written']['test']} test "
          f"{args.format} images ({args.train_per_class} + {args.test_per_class} per class, "
          f"{len(names)} classes) from {info['dataset']}, seed {args.seed}")
    print(f"  layout: {os.path.join(args.out, 'train', '<class>', '*')} and "
          f"{os.path.join(args.out, 'test', '<class>', '*')}; selection in "
          f"{os.path.join(args.out, MANIFEST)}")
    if info["folders"] != [str(n) for n in names]:
        print("  note: some class names were changed to be valid folder names")
    if sorted(info["folders"]) != info["folders"]:
        print("  note: imagefolder: numbers classes in sorted folder-name order, which differs "
              "from this dataset's label order")
    print(f"  use it with: --dataset imagefolder:{args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
