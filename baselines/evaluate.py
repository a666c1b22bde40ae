"""Evaluate a synthetic set: train fresh networks on it, test on the real test set.

Usage (from the repo root)::

    python baselines/evaluate.py runs/x/synthetic.pt --arch convnet,resnet10,densenet121 --runs 5

Loads the set (pixel space), normalises it with the set's own mean/std, decodes factorised sets
(IDC multi-formation, ``meta["factor"] > 1``), evaluates each architecture with the protocol of
docs/methods.md#evaluation-protocol (final-epoch accuracy, never a checkpoint picked by test
accuracy), prints a table and writes ``evaluation.json`` next to the set (results of other
architectures already in that file are kept; an architecture evaluated again is replaced) and
each evaluation as ``evaluations/evaluation-<n>.json`` beside it. A set from another tool (an
ImageFolder directory, a ``res_*.pt``) is never written into: its files go to
``<set>.evaluations/`` beside it (``sets/foo`` -> ``sets/foo.evaluations/``,
``res_X.pt`` -> ``res_X.evaluations/``), or to ``--out``. Errors print one line on stderr and
exit with status 2; an imported set that cannot be read (a truncated or foreign ``res_*.pt``,
an image that is unreadable or of another size, more class folders than the dataset has
classes) is refused naming the file.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

try:
    import baselines.harness  # noqa: F401
except ImportError:  # run as a script from a checkout: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baselines.harness.cpu_threads import prefer_passive_wait  # noqa: E402

prefer_passive_wait()  # before torch loads OpenMP: passive wait when other jobs hold the cores

import json  # noqa: E402

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from baselines.harness.dsa import DSA  # noqa: E402
from baselines.harness.evaluation import PROTOCOLS, evaluate_synset  # noqa: E402
from baselines.harness.exchange import read_dm_result, read_imagefolder  # noqa: E402
from baselines.harness.factorization import decode  # noqa: E402
from baselines.harness.paths import first_existing  # noqa: E402
from baselines.harness.synset import (SynSetError, atomic_write_json, code_version,  # noqa: E402
                                      load_synset)


class CLIError(Exception):
    """A user error reported as one line (exit status 2)."""


def parse_args(argv=None) -> argparse.Namespace:
    from baselines.harness.validation import OneLineParser
    p = OneLineParser(
        description="Evaluate a synthetic set (final-epoch test accuracy, mean ± population std "
                    "over runs); writes evaluation.json and evaluations/ next to our set, or "
                    "into SET.evaluations/ beside a set from another tool.")
    p.add_argument("synset", help="the synthetic set: RUN/synthetic.pt (or RUN), or a set from "
                                  "another tool: an ImageFolder directory (class folders of "
                                  "images, e.g. from baselines/export.py --to imagefolder) or "
                                  "an original DM res_*.pt file")
    p.add_argument("--snapshot", type=int, default=None, metavar="T",
                   help="evaluate the run's snapshot after T iterations (RUN/snapshots/, kept "
                        "by --eval-at / --eval-every) instead of its final set; the results go "
                        "to RUN/snapshots/evaluations/")
    p.add_argument("--dataset", default=None,
                   help="the real dataset of an imported set (ImageFolder or res_*.pt without an "
                        "export.json beside it); ignored for our own synthetic.pt")
    p.add_argument("--arch", default=None,
                   help="comma-separated architectures: convnet, resnet10, resnet18, densenet121, "
                        "convnetdN (default: the run's --eval-arch, else convnet)")
    p.add_argument("--runs", type=int, default=None,
                   help="independent training runs per architecture (default: the run's "
                        "--eval-runs, else 5)")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs per run (default: the run's --eval-epochs, else the "
                        "protocol's 1000)")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default=None,
                   help="dm: DM's (batch 256, DSA); dance: DANCE's (batch 64, IDC's colour+crop, "
                        "CutMix); dsa-cutmix: dm + CutMix p 0.5 (default: the run's "
                        "--eval-protocol, else dm)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where evaluation.json and evaluations/ go (default: the run directory "
                        "of our synthetic.pt; for a set from another tool, SET.evaluations/ "
                        "beside it: sets/foo -> sets/foo.evaluations/, res_X.pt -> "
                        "res_X.evaluations/; never inside an ImageFolder it reads)")
    p.add_argument("--data-path", default=None,
                   help="dataset root directory (default: the run's, else the loader's)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto",
                   help="device to train on; auto = cuda if available (default: auto)")
    p.add_argument("--seed", type=int, default=None,
                   help="evaluation seed; run i is seeded from (seed, i) (default: the run's "
                        "--seed, else 0)")
    p.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                   help="channels-last memory format; auto = on for CPU (faster there), off for "
                        "CUDA (default: auto)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each network (a one-off compile time per run, then "
                        "faster epochs)")
    p.add_argument("--no-progress", action="store_true",
                   help="hide the per-run progress bars (default: shown)")
    args = p.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        p.error("--runs must be >= 1")
    if args.epochs is not None and args.epochs < 1:
        p.error("--epochs must be >= 1")
    return args


def _channel_stats(value, channels: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise CLIError(f"meta[{name!r}] has {t.numel()} entries for {channels}-channel images")
    return t.view(1, channels, 1, 1)


def _read_existing(path: Path) -> dict:
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return old.get("results", {}) if isinstance(old, dict) and isinstance(
        old.get("results"), dict) else {}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _class_folders(folder: Path) -> list[Path]:
    """The class folders of an ImageFolder, in the order :func:`read_imagefolder` numbers them."""
    return sorted(p for p in folder.iterdir() if p.is_dir())


def _first_bad_image(folder: Path, ds) -> str | None:
    """What is wrong with the first image of ``folder`` that cannot be read or is not of
    ``ds``'s size (None when every one is fine): a one-line message naming the file."""
    size = (ds.image_size, ds.image_size)
    for sub in _class_folders(folder):
        for path in sorted(p for p in sub.iterdir() if p.is_file()):
            try:
                with Image.open(path) as image:
                    image.load()
                    width, height = image.size
            except Exception as exc:  # noqa: BLE001 - PIL raises many kinds; the file is named
                return f"cannot read image {path} ({_one_line(exc)}); remove or replace it"
            if (width, height) != size:
                return (f"{path} is {width}x{height} px, but the images of {ds.name} are "
                        f"{size[0]}x{size[1]}; every image of the set must be "
                        f"{size[0]}x{size[1]} (resize it or remove it)")
    return None


def read_imported(path: Path, ds) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-space images and labels of an imported set of dataset ``ds``: an ImageFolder
    directory or a DM ``res_*.pt``. A CLIError naming the file or folder for one that cannot
    be evaluated: more class folders than ``ds`` has classes, an unreadable image or one of
    another size, a ``res_*.pt`` that does not unpickle (truncated, not a torch file) or does
    not hold ``{"data": [[images, labels]]}`` of ``ds``'s classes."""
    if path.is_dir():
        classes = _class_folders(path)
        if len(classes) > ds.num_classes:
            extra = ", ".join(p.name for p in classes[ds.num_classes:][:3])
            raise CLIError(f"{path} has {len(classes)} class folders but {ds.name} has "
                           f"{ds.num_classes} classes; the folders past the "
                           f"{ds.num_classes}th in sorted order ({extra}"
                           f"{', ...' if len(classes) > ds.num_classes + 3 else ''}) have no "
                           f"class: remove them")
        try:
            images, labels = read_imagefolder(path, ds.channels)
        except Exception as exc:  # noqa: BLE001 - diagnosed file by file below
            raise CLIError(_first_bad_image(path, ds) or f"{path}: {_one_line(exc)}") from None
        return images, labels
    try:
        images, labels = read_dm_result(path, ds.mean, ds.std)
    except ValueError as exc:  # read_dm_result's own message, naming the file
        raise CLIError(" ".join(str(exc).split())) from None
    except Exception as exc:  # noqa: BLE001 - torch.load raises many kinds for a broken file
        raise CLIError(f"{path} cannot be read as a DM result file (truncated, or of another "
                       f"format?): {_one_line(exc)}") from None
    if images.ndim != 4 or labels.shape != (images.shape[0],):
        raise CLIError(f"{path}: data[-1] holds images of shape {tuple(images.shape)} and labels "
                       f"of shape {tuple(labels.shape)}; a DM result holds (N, C, H, W) and (N,)")
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < ds.num_classes:
        raise CLIError(f"{path}: labels range over [{int(labels.min())}, {int(labels.max())}] "
                       f"but {ds.name} has classes 0..{ds.num_classes - 1}; give its --dataset")
    return images, labels


def evaluations_folder(path: Path) -> Path:
    """Where the evaluations of a set from another tool go: ``<set>.evaluations/`` beside
    it (``sets/foo`` -> ``sets/foo.evaluations``, ``res_X.pt`` -> ``res_X.evaluations``), so
    that an ImageFolder is never written into (a second evaluation would read our files as
    images) and two ``res_*.pt`` in one folder keep their results apart."""
    path = path.resolve()
    return path.parent / f"{path.name if path.is_dir() else path.stem}.evaluations"


def load_any_set(path: Path, dataset: str | None, data_path: str | None,
                 out: str | None = None):
    """``(SynSet, where evaluation.json goes)`` for our ``synthetic.pt`` (or a run directory
    holding one), an ImageFolder directory or an original DM ``res_*.pt``. An imported set is
    taken as decoded (factor 1) pixel-space images of ``dataset`` (or of the dataset its
    ``export.json`` names), with that dataset's mean/std. ``evaluation.json`` goes to ``out``
    when given, else beside our set, else to :func:`evaluations_folder`."""
    from baselines.harness.datasets import load_dataset
    from baselines.harness.synset import SynSet
    if path.is_dir() and (path / "synthetic.pt").is_file():
        path = path / "synthetic.pt"
    imported = path.is_dir() or (path.is_file() and path.name.startswith("res_"))
    if out is not None and path.is_dir() and Path(out).resolve().is_relative_to(path.resolve()):
        raise CLIError(f"--out {out} is inside the set {path} it would read; choose a place "
                       f"outside it")
    if not imported:
        folder = Path(out) if out is not None else path.resolve().parent
        return load_synset(path), folder / "evaluation.json"
    record = path / "export.json" if path.is_dir() else path.parent / "export.json"
    if dataset is None and record.is_file():
        dataset = json.loads(record.read_text()).get("dataset")
    if dataset is None:
        raise CLIError(f"{path} is a set from another tool; name its dataset with --dataset")
    ds = load_dataset(dataset, data_path)
    images, labels = read_imported(path, ds)
    meta = {"dataset": ds.name, "mean": list(ds.mean), "std": list(ds.std), "factor": 1,
            "method": "imported", "plugins": [], "ipc": None, "seed": None,
            "source": str(path.resolve())}
    folder = Path(out) if out is not None else evaluations_folder(path)
    return SynSet(images, labels, meta), folder / "evaluation.json"


FALLBACK = {"runs": 5, "epochs": None, "protocol": "dm", "arch": "convnet", "seed": 0,
            "data_path": None}
"""What an evaluation uses when neither a flag nor the run's config.json says."""


def follow_the_run(args: argparse.Namespace, path: Path) -> dict:
    """Fill the flags not given from the run's ``config.json`` beside the set (its
    evaluation protocol, budget, architectures, seed and data path), else :data:`FALLBACK`.
    Returns where each came from (``flag``, ``run``, ``default``)."""
    config = {}
    folder = path if path.is_dir() else path.parent
    if (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text())
        except ValueError:
            config = {}
    from_run = {"runs": config.get("eval_runs") or None, "epochs": config.get("eval_epochs"),
                "protocol": config.get("eval_protocol"),
                "arch": ",".join(config["eval_arch"]) if config.get("eval_arch") else None,
                "seed": config.get("seed"), "data_path": config.get("data_path")}
    sources = {}
    for key, fallback in FALLBACK.items():
        if getattr(args, key) is not None:
            sources[key] = "flag"
        elif from_run.get(key) is not None:
            setattr(args, key, from_run[key])
            sources[key] = "run"
        else:
            setattr(args, key, fallback)
            sources[key] = "default"
    return sources


def next_evaluation_path(folder: Path, stem: str = "evaluation") -> Path:
    """``folder/evaluations/<stem>-<n>.json`` with the first unused n (never overwrites)."""
    n = 1
    while (folder / "evaluations" / f"{stem}-{n}.json").exists():
        n += 1
    return folder / "evaluations" / f"{stem}-{n}.json"


def snapshot_path(run: Path, iteration: int) -> Path:
    """The set a run kept after ``iteration`` iterations (``RUN`` or ``RUN/synthetic.pt``
    names the run); a CLIError naming the points it has when there is none."""
    from baselines.harness.runs import RunDir
    folder = run.parent if run.is_file() else run
    if not (folder / "config.json").is_file():
        raise CLIError(f"--snapshot needs a run directory; {run} is not one")
    path = RunDir(folder).snapshot_set_path(iteration)
    if not path.is_file():
        have = sorted(int(p.stem.split("-")[1]) for p in folder.glob("snapshots/iter-*.pt"))
        hint = (f"it has {', '.join(map(str, have))}" if have else
                "it kept none (run it with --eval-at or --eval-every)")
        raise CLIError(f"{folder} has no snapshot at iteration {iteration}; {hint}")
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    from baselines.harness.common import UsageError, resolve_device
    from baselines.harness.datasets import DatasetError, load_dataset
    from baselines.harness.networks import get_network

    try:
        sources = follow_the_run(args, Path(args.synset))
        if args.protocol not in PROTOCOLS:
            raise CLIError(f"the run's evaluation protocol {args.protocol!r} is unknown here; "
                           f"give --protocol")
        where = Path(args.synset)
        if args.snapshot is not None:
            where = snapshot_path(where, args.snapshot)
        synset, out_path = load_any_set(where, args.dataset, args.data_path, args.out)
        meta = synset.meta
        if synset.images.shape[0] == 0:
            raise CLIError(f"{args.synset} holds no images; there is nothing to evaluate")
        if out_path.exists() and not out_path.is_file():
            raise CLIError(f"{out_path} (where the results go) is a directory; move it away")
        base = first_existing(out_path.parent)
        if not base.is_dir():
            raise CLIError(f"{out_path.parent} (where the results go) is under {base}, a file; "
                           f"give --out a directory")
        if not os.access(base, os.W_OK | os.X_OK):
            raise CLIError(f"{out_path.parent} is not writable (read-only file system or no "
                           f"permission); give --out a place you can write to")
        ds = load_dataset(meta["dataset"], args.data_path)
        _, c, h, w = synset.images.shape
        if c != ds.channels or h != ds.image_size or w != ds.image_size:
            raise CLIError(f"{args.synset}: images are {c}x{h}x{w} but dataset "
                           f"{meta['dataset']!r} is {ds.channels}x{ds.image_size}x{ds.image_size}")
        archs = [a.strip() for a in args.arch.split(",") if a.strip()]
        if not archs:
            raise CLIError("--arch is empty")
        for arch in archs:  # fail before any training if a name is wrong
            try:
                get_network(arch, ds.channels, ds.num_classes, ds.image_size)
            except ValueError as err:
                raise CLIError(str(err)) from None
        device = resolve_device(args.device)
    except (SynSetError, DatasetError, CLIError, UsageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    mean = _channel_stats(meta["mean"], c, "mean")
    std = _channel_stats(meta["std"], c, "std")
    if not (torch.allclose(mean.flatten(), torch.tensor(ds.mean, dtype=torch.float32), atol=1e-4)
            and torch.allclose(std.flatten(), torch.tensor(ds.std, dtype=torch.float32),
                               atol=1e-4)):
        print(f"warning: the set's mean/std {meta['mean']}/{meta['std']} differ from the test "
              f"set's {list(ds.mean)}/{list(ds.std)}; each is normalised with its own",
              file=sys.stderr)
    images = (synset.images - mean) / std
    factor = int(meta.get("factor") or 1)
    images, labels = decode(images, synset.labels, factor)
    augment = DSA(flip=not ds.is_digit_like)

    results = {}
    for arch in archs:
        res = evaluate_synset(images, labels, ds.test.images, ds.test.labels, arch,
                              runs=args.runs, protocol=args.protocol, epochs=args.epochs,
                              seed=args.seed, device=device, augment=augment,
                              progress=not args.no_progress, num_classes=ds.num_classes,
                              channels_last=args.channels_last == "on" or (
                                  args.channels_last == "auto" and device.type == "cpu"),
                              compile=args.compile)
        res["seed"] = args.seed
        results[arch] = res

    width = max(len("arch"), *(len(a) for a in archs))
    print(f"{'arch':<{width}} | {'accuracy (%)':>15} | runs")
    print(f"{'-' * width}-+-{'-' * 15}-+-----")
    for arch, r in results.items():
        print(f"{arch:<{width}} | {r['accuracy_mean']:6.2f} ± {r['accuracy_std']:5.2f} | {r['runs']}")

    evaluation = next_evaluation_path(out_path.parent, "evaluation" if args.snapshot is None
                                      else f"iter-{args.snapshot:06d}")
    first = results[archs[0]]
    atomic_write_json(evaluation, {  # the schema of a run's results.json
        **first, "arch": archs[0], "per_arch": [{**r, "arch": a} for a, r in results.items()],
        "method": meta.get("method"), "plugins": meta.get("plugins"), "ipc": meta.get("ipc"),
        "dataset": meta["dataset"], "iterations": (meta.get("config") or {}).get("iterations"),
        "preset": (meta.get("config") or {}).get("preset"), "synset": str(
            where.resolve()), "settings_from": sources, "snapshot": args.snapshot,
        "eval_code_version": code_version()})
    print(f"wrote {evaluation}")
    merged = {**_read_existing(out_path), **results}
    atomic_write_json(out_path, {
        "synset": str(Path(args.synset).resolve()),
        "dataset": meta["dataset"], "method": meta.get("method"),
        "plugins": meta.get("plugins"), "ipc": meta.get("ipc"), "factor": factor,
        "synset_seed": meta.get("seed"), "synset_code_version": meta.get("code_version"),
        "eval_code_version": code_version(),
        "images_evaluated": int(images.shape[0]),
        "note": "final-epoch test accuracy in percent; std is the population std (ddof=0)",
        "results": merged,
    })
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
