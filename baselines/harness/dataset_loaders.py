"""The loaders behind :func:`baselines.harness.datasets.load_dataset`, one per kind of source.

Contract: each registered loader is ``loader(name, data_path, download) -> Dataset`` for the
canonical names its ``@register_dataset(...)`` lists (``datasets`` imports this module the first
time it needs the registry; registration order is the order of ``available_datasets()``).
``_load_imagefolder(path)`` serves ``imagefolder:PATH``. Every loader returns a
:class:`~baselines.harness.datasets.Dataset` of normalised float32 images and int64 labels, and
raises :class:`~baselines.harness.datasets.DatasetError` (one line saying what to do) for
missing or unreadable files. Reading the image files themselves is
:mod:`baselines.harness.image_files`.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dm_plugins.data import ClassIndexedTensors

from .datasets import (_IMAGEFOLDER_LAYOUT, IMAGENET_MEAN, IMAGENET_STD, IMAGENET_SUBSETS,
                       Dataset, DatasetError, register_dataset)
from .image_files import (decode_images, list_images, pixels_uint8_to_float, read_lines,
                          resize_square)

_TORCHVISION = {
    # name: (torchvision class name, mean, std, folder torchvision creates under data_path)
    "mnist": ("MNIST", (0.1307,), (0.3081,), "MNIST/raw"),
    "fashion-mnist": ("FashionMNIST", (0.2861,), (0.3530,), "FashionMNIST/raw"),
    "cifar10": ("CIFAR10", (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
                "cifar-10-batches-py"),
    "cifar100": ("CIFAR100", (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762),
                 "cifar-100-python"),
}


def _normalize_(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (unbiased) std of (N, C, H, W) pixels."""
    var, mean = torch.var_mean(x, dim=(0, 2, 3))
    return tuple(float(v) for v in mean), tuple(float(v) for v in var.sqrt())


def _make(name, train_x, train_y, test_x, test_y, mean, std, class_names) -> Dataset:
    n = len(class_names)
    _normalize_(train_x, mean, std)
    _normalize_(test_x, mean, std)
    return Dataset(name=name,
                   train=ClassIndexedTensors(train_x, torch.as_tensor(train_y).long(), n),
                   test=ClassIndexedTensors(test_x, torch.as_tensor(test_y).long(), n),
                   mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
                   class_names=list(class_names))


# -------------------------------------------------------------------------------------- digits

@register_dataset("digits")
def _load_digits(name: str = "digits", data_path: str | None = None,
                 download: bool = True) -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetError("the 'digits' dataset needs scikit-learn; pip install scikit-learn") \
            from None
    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp_(0, 1)
    y = np.asarray(bunch.target, dtype=np.int64)
    # fixed legacy-numpy stream: the split is identical on every machine and numpy version
    rng = np.random.RandomState(0)
    is_test = np.zeros(len(y), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        n_test = int(round(0.2 * len(idx)))
        is_test[idx[rng.permutation(len(idx))[:n_test]]] = True
    train_x, test_x = x[~is_test].contiguous(), x[is_test].contiguous()
    mean, std = _channel_stats(train_x)
    return _make("digits", train_x, y[~is_test], test_x, y[is_test], mean, std,
                 [str(c) for c in range(10)])


# --------------------------------------------------------------------------------- torchvision

@register_dataset(*_TORCHVISION)
def _load_torchvision(name: str, data_path: str, download: bool) -> Dataset:
    import torchvision.datasets as tvd

    cls_name, mean, std, folder = _TORCHVISION[name]
    cls = getattr(tvd, cls_name)
    where = os.path.join(os.path.abspath(data_path), folder)
    from .folders import missing_ancestors, remove_if_empty
    created = missing_ancestors(os.path.join(where, "raw"))  # what a download attempt makes
    splits = []
    for train in (True, False):
        try:
            ds = cls(root=data_path, train=train, download=download)
        except Exception as err:
            remove_if_empty(created)  # a failed download leaves no empty folders behind
            if os.path.isdir(where) and os.listdir(where):
                raise DatasetError(
                    f"{name}: the files in {where} are incomplete or corrupted "
                    f"({type(err).__name__}: {err}); delete that folder and download again"
                ) from None
            if download:
                raise DatasetError(
                    f"{name}: files not found in {data_path} and the download failed "
                    f"({type(err).__name__}: {err}); put the torchvision {name} files in {where} "
                    f"or run once with network access") from None
            raise DatasetError(f"{name}: files not found (download disabled); put the torchvision "
                               f"{name} files in {where} or allow downloading") from None
        splits.append((pixels_uint8_to_float(ds.data), torch.as_tensor(ds.targets).long(),
                       list(ds.classes)))
    (train_x, train_y, classes), (test_x, test_y, _) = splits
    return _make(name, train_x, train_y, test_x, test_y, mean, std, classes)


# ------------------------------------------------------------------------------- tiny imagenet

@register_dataset("tinyimagenet")
def _load_tinyimagenet(name: str, data_path: str, download: bool = True) -> Dataset:
    root = data_path
    if not os.path.isfile(os.path.join(root, "wnids.txt")):
        root = os.path.join(data_path, "tiny-imagenet-200")
    layout = ("tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, "
              "val/val_annotations.txt}")
    if not os.path.isfile(os.path.join(root, "wnids.txt")):
        raise DatasetError(f"tinyimagenet: {os.path.abspath(root)}/wnids.txt not found; unzip "
                           f"tiny-imagenet-200.zip (http://cs231n.stanford.edu/tiny-imagenet-200.zip) "
                           f"into {os.path.abspath(data_path)} so it holds {layout}")
    # label order = sorted wnids, the torchvision ImageFolder convention on train/
    wnids = sorted(set(read_lines(os.path.join(root, "wnids.txt"))))
    index = {w: i for i, w in enumerate(wnids)}

    train_paths, train_y = [], []
    for w in wnids:
        d = os.path.join(root, "train", w)
        files = list_images(d)
        if not files:
            raise DatasetError(f"tinyimagenet: no training images in {d}; expected {layout}")
        train_paths += files
        train_y += [index[w]] * len(files)

    val_paths, val_y = [], []
    ann = os.path.join(root, "val", "val_annotations.txt")
    if os.path.isfile(ann):
        # the original layout: val/images/<file> with labels in the annotation file
        for line in read_lines(ann):
            parts = line.split("\t") if "\t" in line else line.split()
            fname, w = parts[0], parts[1]
            if w not in index:
                raise DatasetError(f"tinyimagenet: {ann} names class {w} that is not in wnids.txt; "
                                   f"re-extract the dataset")
            p = os.path.join(root, "val", "images", fname)
            if not os.path.isfile(p):  # already reorganised into val/<wnid>/[images/]
                alt = [os.path.join(root, "val", w, "images", fname), os.path.join(root, "val", w, fname)]
                p = next((a for a in alt if os.path.isfile(a)), None)
                if p is None:
                    raise DatasetError(f"tinyimagenet: validation image {fname} listed in {ann} "
                                       f"is missing; re-extract the dataset")
            val_paths.append(p)
            val_y.append(index[w])
    else:
        for w in wnids:
            files = list_images(os.path.join(root, "val", w))
            val_paths += files
            val_y += [index[w]] * len(files)
    if not val_paths:
        raise DatasetError(f"tinyimagenet: no validation images under {os.path.join(root, 'val')}; "
                           f"expected {layout}")

    names = list(wnids)
    words = os.path.join(root, "words.txt")
    if os.path.isfile(words):
        table = {}
        for line in read_lines(words):
            w, _, text = line.partition("\t")
            table[w] = text.split(",")[0].strip() or w
        names = [table.get(w, w) for w in wnids]

    transform = resize_square(64)
    train_x = pixels_uint8_to_float(decode_images(train_paths, transform, mode="RGB"))
    test_x = pixels_uint8_to_float(decode_images(val_paths, transform, mode="RGB"))
    return _make("tinyimagenet", train_x, train_y, test_x, val_y, IMAGENET_MEAN, IMAGENET_STD,
                 names)


# ---------------------------------------------------------------------------- imagenet subsets

def _imagenet_wnids(root: str) -> list[str]:
    """The 1000 ImageNet-1k wnids in class-index order.

    Index i is the i-th of the sorted ``train/`` folder names (torchvision ImageFolder convention)
    when all 1000 folders are present. A folder holding only some classes works if it has a
    ``wnids.txt`` (one wnid per line) or ``LOC_synset_mapping.txt`` (``wnid name...`` per line,
    Kaggle ImageNet format) listing all 1000 wnids in index order.
    """
    for fname in ("wnids.txt", "LOC_synset_mapping.txt"):
        p = os.path.join(root, fname)
        if os.path.isfile(p):
            wnids = [line.split()[0] for line in read_lines(p)]
            if len(wnids) != 1000:
                raise DatasetError(f"{p} lists {len(wnids)} wnids; it must list all 1000 ImageNet-1k "
                                   f"wnids in class-index order")
            return wnids
    train = os.path.join(root, "train")
    folders = sorted(e.name for e in os.scandir(train) if e.is_dir() and not e.name.startswith("."))
    if len(folders) != 1000:
        raise DatasetError(f"{train} has {len(folders)} class folders; class indices need all 1000 "
                           f"ImageNet-1k folders (index = sorted position) or a wnids.txt in "
                           f"{root} listing the 1000 wnids in index order")
    return folders


@register_dataset(*IMAGENET_SUBSETS)
def _load_imagenet_subset(name: str, data_path: str, download: bool = True) -> Dataset:
    root = os.path.abspath(data_path)
    if not (os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "val"))):
        raise DatasetError(f"{name}: no ImageNet folder at {root}; pass a data path holding "
                           f"train/<wnid>/* and val/<wnid>/* (ImageNet-1k, val sorted into class "
                           f"folders)")
    all_wnids = _imagenet_wnids(root)
    indices = IMAGENET_SUBSETS[name]
    wnids = [all_wnids[i] for i in indices]
    paths = {"train": ([], []), "val": ([], [])}
    for split, (ps, ys) in paths.items():
        for label, w in enumerate(wnids):
            files = list_images(os.path.join(root, split, w))
            if not files:
                raise DatasetError(f"{name}: no images in {os.path.join(root, split, w)}; this subset "
                                   f"needs the {split} folders of {', '.join(wnids)}")
            ps += files
            ys += [label] * len(files)
    try:
        from torchvision.models._meta import _IMAGENET_CATEGORIES as categories  # private, optional
        names = [categories[i] for i in indices]
    except Exception:
        names = list(wnids)
    transform = resize_square(128)
    train_x = pixels_uint8_to_float(decode_images(paths["train"][0], transform, mode="RGB"))
    test_x = pixels_uint8_to_float(decode_images(paths["val"][0], transform, mode="RGB"))
    return _make(name, train_x, paths["train"][1], test_x, paths["val"][1], IMAGENET_MEAN,
                 IMAGENET_STD, names)


# -------------------------------------------------------------------------------- image folder

def _load_imagefolder(path: str) -> Dataset:
    from PIL import Image

    root = os.path.expanduser(path)
    train_dir = os.path.join(root, "train")
    test_dir = os.path.join(root, "test")
    if not os.path.isdir(test_dir) and os.path.isdir(os.path.join(root, "val")):
        test_dir = os.path.join(root, "val")
    if not (os.path.isdir(train_dir) and os.path.isdir(test_dir)):
        raise DatasetError(f"imagefolder: {os.path.abspath(root)} does not have train/ and test/ "
                           f"folders; expected layout {_IMAGEFOLDER_LAYOUT}")

    def classes_of(d: str) -> list[str]:
        return sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))

    classes = classes_of(train_dir)
    if not classes:
        raise DatasetError(f"imagefolder: {train_dir} has no class folders; expected layout "
                           f"{_IMAGEFOLDER_LAYOUT}")
    test_classes = classes_of(test_dir)
    if test_classes != classes:
        diff = sorted(set(classes) ^ set(test_classes))
        raise DatasetError(f"imagefolder: class folders differ between {train_dir} and {test_dir} "
                           f"(e.g. {', '.join(diff[:5])}); both splits need the same classes")

    split_files = []
    for d in (train_dir, test_dir):
        ps, ys = [], []
        for label, c in enumerate(classes):
            files = list_images(os.path.join(d, c))
            ps += files
            ys += [label] * len(files)
        if not ps:
            raise DatasetError(f"imagefolder: no image files under {d}; expected layout "
                               f"{_IMAGEFOLDER_LAYOUT}")
        split_files.append((ps, ys))

    try:
        with Image.open(split_files[0][0][0]) as first:
            target = first.size
    except Exception as err:
        raise DatasetError(f"cannot read image {split_files[0][0][0]}: {type(err).__name__}; remove "
                           f"or replace the file") from None
    all_paths = split_files[0][0] + split_files[1][0]

    def fit(img):
        return img if img.size == target else img.resize(target, Image.BILINEAR)

    # mode=None: gray stays 1-channel only if every image (both splits) is gray
    pixels = decode_images(all_paths, fit, mode=None)
    n_train = len(split_files[0][0])
    train_x = pixels_uint8_to_float(pixels[:n_train])
    test_x = pixels_uint8_to_float(pixels[n_train:])
    del pixels
    mean, std = _channel_stats(train_x)
    name = "imagefolder:" + path
    return _make(name, train_x, split_files[0][1], test_x, split_files[1][1], mean, std, classes)
