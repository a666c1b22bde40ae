"""Synthetic sets in other tools' formats, both ways.

Written (``baselines/export.py``), always decoded (factorisation undone: what a network trains
on) and labelled:

* ``imagefolder``: ``OUT/<class index>_<class name>/<n>.png``, 8-bit pixels (the index zero-padded
  to at least 3 digits, so sorted folder names are class order; the name from the set's meta,
  else from an image-folder dataset's ``train/``, else the index again, as in older exports,
  which read back the same). What DD-Ranking and torchvision's ``ImageFolder`` read; normalise
  with the mean/std in ``OUT/export.json``.
* ``tensor``: ``OUT/images.pt`` (N, C, H, W) float32 **normalised** with the dataset's mean/std
  and ``OUT/labels.pt`` (N,) int64. DD-Ranking takes such tensors as they are and normalises
  its own test set with its own statistics (:data:`DDRANKING_DATASETS`): export with those
  (``mean`` / ``std`` from :func:`ddranking_stats`; ``export.py --stats ddranking``).
* ``dm``: ``OUT/res_DM_<DATASET>_ConvNet_<ipc>ipc.pt`` holding ``{"data": [[images, labels]],
  "accs_all_exps": {}}`` with normalised images, as the original DM code saves its results (its
  loaders and DANCE's ``test.py`` read ``data[-1]``).

Every export writes ``OUT/export.json``: format, dataset, mean, std, the space the images are
in, how many images per class, the source run. Read (``evaluate.py`` on a folder or a
``res_*.pt``): :func:`read_imagefolder` and :func:`read_dm_result` give pixel-space images.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dm_plugins.atomic import atomic_torch_save

from .datasets import IMAGENET_MEAN, IMAGENET_STD
from .synset import atomic_write_json

FORMATS = ("imagefolder", "tensor", "dm")

# DD-Ranking 0.2.0 (PyPI ``ddranking``) evaluates on its own datasets only; its ``get_dataset``
# normalises their real images with these statistics (CIFAR-100 with CIFAR-10's) and uses a
# synthetic tensor as it is given.
_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
_IMAGENET_STATS = (IMAGENET_MEAN, IMAGENET_STD)
#: our dataset name -> (DD-Ranking's name for it, its class count, mean, std)
DDRANKING_DATASETS = {
    "cifar10": ("CIFAR10", 10, *_CIFAR10_STATS), "cifar100": ("CIFAR100", 100, *_CIFAR10_STATS),
    "tinyimagenet": ("TinyImageNet", 200, *_IMAGENET_STATS),
    "imagenette": ("ImageNette", 10, *_IMAGENET_STATS),
    "imagewoof": ("ImageWoof", 10, *_IMAGENET_STATS),
    "imagemeow": ("ImageMeow", 10, *_IMAGENET_STATS),
    "imagesquawk": ("ImageSquawk", 10, *_IMAGENET_STATS),
    "imagefruit": ("ImageFruit", 10, *_IMAGENET_STATS),
    "imageyellow": ("ImageYellow", 10, *_IMAGENET_STATS),
}


def ddranking_stats(dataset: str, name: str | None = None, *, channels: int,
                    num_classes: int) -> tuple[str, tuple[float, ...], tuple[float, ...]]:
    """(DD-Ranking's dataset name, mean, std) to normalise a set of ``dataset`` the way
    DD-Ranking normalises that dataset's test images. ``name`` (a DD-Ranking dataset, e.g.
    ``"CIFAR10"``) is for a run on a subset of it kept as an image folder (``make_subset.py``'s
    ``cifar10-mini``); its labels must mean DD-Ranking's classes. A dataset DD-Ranking does not
    have, or a set of another class count or channel count, is a one-line ``ValueError``."""
    known = ", ".join(v[0] for v in DDRANKING_DATASETS.values())
    if name is None:
        if dataset not in DDRANKING_DATASETS:
            raise ValueError(f"DD-Ranking has no dataset {dataset!r}: it evaluates on its own "
                             f"({known}); for a subset of one of them kept as an image folder, "
                             f"name it (--stats ddranking:CIFAR10)")
        entry = DDRANKING_DATASETS[dataset]
    else:
        entry = {v[0].lower(): v for v in DDRANKING_DATASETS.values()}.get(name.lower())
        if entry is None:
            raise ValueError(f"DD-Ranking has no dataset {name!r}; it has {known}")
    ddr, classes, mean, std = entry
    if (channels, num_classes) != (3, classes):
        raise ValueError(f"DD-Ranking's {ddr} has {classes} classes of 3-channel images, this "
                         f"set {num_classes} classes of {channels}-channel images")
    return ddr, tuple(mean), tuple(std)


def _normalize(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    c = pixels.shape[1]
    m = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1).expand(1, c, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1).expand(1, c, 1, 1)
    return (pixels - m) / s


def _denormalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    c = images.shape[1]
    m = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1).expand(1, c, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1).expand(1, c, 1, 1)
    return images * s + m


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", str(name)).strip("_") or "class"


def dataset_tag(dataset: str) -> str:
    """The DM code's dataset name in its result files (``CIFAR10``, ``MNIST``, ...)."""
    known = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "mnist": "MNIST",
             "fashion-mnist": "FashionMNIST", "tinyimagenet": "TinyImageNet"}
    return known.get(dataset, _slug(dataset.split(":", 1)[-1].rstrip("/").split("/")[-1]))


def class_names_of(meta: dict, num_classes: int) -> list[str] | None:
    """A set's class names: its meta's ``class_names`` (runs record them), else the sorted
    class folders of an ``imagefolder:PATH`` dataset's ``PATH/train`` still on disk (the
    loader's order), else None (the export then names a class by its index)."""
    names = meta.get("class_names")
    if not names and str(meta.get("dataset", "")).startswith("imagefolder:"):
        train = Path(meta["dataset"][len("imagefolder:"):]) / "train"
        if train.is_dir():
            names = sorted(p.name for p in train.iterdir()
                           if p.is_dir() and not p.name.startswith("."))
    return [str(n) for n in names] if names and len(names) == num_classes else None


def export(pixels: torch.Tensor, labels: torch.Tensor, out: Path, fmt: str, *, dataset: str,
           mean, std, class_names: list[str] | None = None, ipc: int | None = None,
           source: str | None = None, extra: dict | None = None) -> dict:
    """Write decoded pixel-space images ``pixels`` (N, C, H, W in [0, 1]) with ``labels`` to
    ``out`` in ``fmt`` (:data:`FORMATS`), normalised (``tensor``, ``dm``) with ``mean`` /
    ``std``; returns what ``export.json`` records (``extra`` added to it)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    out.mkdir(parents=True, exist_ok=True)
    pixels = pixels.detach().cpu().float().clamp(0, 1)
    labels = labels.detach().cpu().long()
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    names = class_names or [str(c) for c in range(num_classes)]
    record = {"format": fmt, "dataset": dataset, "mean": list(mean), "std": list(std),
              "images": int(pixels.shape[0]), "per_class": torch.bincount(
                  labels, minlength=num_classes).tolist(), "source": source, **(extra or {})}
    if fmt == "imagefolder":
        width = max(3, len(str(num_classes - 1)))
        for c in range(num_classes):
            folder = out / f"{c:0{width}d}_{_slug(names[c])}"
            folder.mkdir(exist_ok=True)
            for n, image in enumerate(pixels[labels == c]):
                array = (image * 255).round().byte().permute(1, 2, 0).numpy()
                Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(
                    folder / f"{n:05d}.png")
        record["space"] = "pixels, 8-bit PNG; normalise with mean/std"
    elif fmt == "tensor":
        atomic_torch_save(out / "images.pt", _normalize(pixels, mean, std))
        atomic_torch_save(out / "labels.pt", labels)
        record["space"] = "normalised with mean/std"
    else:
        name = f"res_DM_{dataset_tag(dataset)}_ConvNet_{ipc or 0}ipc.pt"
        atomic_torch_save(out / name, {"data": [[_normalize(pixels, mean, std), labels]],
                                       "accs_all_exps": {}})
        record["space"] = "normalised with mean/std"
        record["file"] = name
    atomic_write_json(out / "export.json", record)
    return record


def read_imagefolder(folder: Path, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-space images (N, C, H, W) and labels from ``folder/<class>/<image>``; classes are
    the sub-folders in sorted order, as torchvision's ``ImageFolder`` numbers them."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    images, labels = [], []
    for c, sub in enumerate(classes):
        for path in sorted(p for p in sub.iterdir() if p.is_file()):
            with Image.open(path) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                array = np.asarray(im, dtype=np.float32) / 255.0
            tensor = torch.from_numpy(array)
            images.append(tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1))
            labels.append(c)
    if not images:
        raise ValueError(f"{folder} holds no images in class folders")
    return torch.stack(images), torch.tensor(labels)


def read_dm_result(path: Path, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-space images and labels of the last experiment in an original DM ``res_*.pt``
    (``{"data": [[images, labels], ...]}``, images normalised with ``mean`` / ``std``).

    Read with ``weights_only=True``: the original code saves only tensors, lists, dicts and
    numbers, and a file holding anything else (which unpickling would run) is refused."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    try:
        images, labels = saved["data"][-1][0], saved["data"][-1][1]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"{path} is not a DM result file ({{'data': [[images, labels]]}})") \
            from None
    return _denormalize(images.float(), mean, std).clamp(0, 1), labels.long()
