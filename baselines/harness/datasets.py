"""Datasets for distillation and evaluation, loaded fully into memory as normalised tensors.

``load_dataset(name)`` returns a :class:`Dataset` whose ``train``/``test`` splits are
:class:`dm_plugins.data.ClassIndexedTensors` holding normalised float32 images (N, C, H, W) and
int64 labels. Supported names (case-insensitive; ``-``/``_`` ignored, so ``CIFAR-10`` works):

* ``digits`` — scikit-learn's bundled 8x8 handwritten digits upsampled to 32x32, 1 channel;
  embedded, no download. Deterministic stratified split (20% of each class to test, seed 0).
* ``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100`` — torchvision files under ``data_path``
  (default ``./data``), downloaded if absent and ``download=True``.
* ``tinyimagenet`` — the standard ``tiny-imagenet-200`` folder (64 px).
* ``imagenette``, ``imagewoof``, ``imagemeow``, ``imagesquawk``, ``imagefruit``, ``imageyellow`` —
  10-class ImageNet subsets read from an ImageNet folder (128 px).
* ``imagefolder:PATH`` — any ``PATH/train/<class>/*`` + ``PATH/test/<class>/*`` image folder.

Every user-facing failure raises :class:`DatasetError` with a one-line message saying what to do.
"""
from __future__ import annotations

import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dm_plugins.data import ClassIndexedTensors

__all__ = ["Dataset", "DatasetError", "load_dataset", "available_datasets", "IMAGENET_SUBSETS"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_TORCHVISION = {
    # name: (torchvision class name, mean, std, folder torchvision creates under data_path)
    "mnist": ("MNIST", (0.1307,), (0.3081,), "MNIST/raw"),
    "fashion-mnist": ("FashionMNIST", (0.2861,), (0.3530,), "FashionMNIST/raw"),
    "cifar10": ("CIFAR10", (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
                "cifar-10-batches-py"),
    "cifar100": ("CIFAR100", (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762),
                 "cifar-100-python"),
}

IMAGENET_SUBSETS: dict[str, list[int]] = {
    "imagenette": [0, 217, 482, 491, 497, 566, 569, 571, 574, 701],
    "imagewoof": [193, 182, 258, 162, 155, 167, 159, 273, 207, 229],
    "imagemeow": [281, 282, 283, 284, 285, 291, 292, 290, 289, 287],
    "imagesquawk": [84, 130, 88, 144, 145, 22, 96, 9, 100, 89],
    "imagefruit": [953, 954, 949, 950, 951, 957, 952, 945, 943, 948],
    "imageyellow": [309, 986, 954, 951, 987, 779, 599, 291, 72, 11],
}

_DIGIT_LIKE = ("digits", "mnist", "fashion-mnist")
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                     ".pgm", ".pbm")
_ALIASES = {"fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist", "tinyimagenet200":
            "tinyimagenet"}
_IMAGEFOLDER_LAYOUT = "PATH/train/<class>/*.png|jpg and PATH/test/<class>/*.png|jpg"


class DatasetError(Exception):
    """A dataset cannot be loaded; the message is one line saying what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass
class Dataset:
    """A dataset held in memory.

    Attributes:
        name: canonical name (``"cifar10"``, ``"imagefolder:/path"`` ...), what
            :func:`load_dataset` accepts to load it again.
        train, test: normalised float32 images (N, C, H, W) and int64 labels, indexed by class.
        mean, std: per-channel normalisation (pixel space [0, 1] -> normalised).
        class_names: one name per label, in label order.
    """

    name: str
    train: ClassIndexedTensors
    test: ClassIndexedTensors
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> int:
        """Image height (all supported datasets are square)."""
        return int(self.train.images.shape[2])

    @property
    def is_digit_like(self) -> bool:
        """True for the MNIST family and ``digits``: DSA drops the flip augmentation there."""
        return self.name in _DIGIT_LIKE

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = x.dtype if x.is_floating_point() else torch.float32
        mean = torch.tensor(self.mean, dtype=dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=dtype, device=x.device).view(-1, 1, 1)
        return mean, std

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixel space [0, 1] (..., C, H, W) -> normalised; differentiable, returns a new tensor."""
        mean, std = self._stats(pixels)
        return (pixels - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised (..., C, H, W) -> pixel space (not clamped); differentiable."""
        mean, std = self._stats(x)
        return x * std + mean


# ------------------------------------------------------------------------------------- helpers

def available_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset` (``imagefolder:PATH`` takes any folder path)."""
    return (["digits", *_TORCHVISION, "tinyimagenet", *IMAGENET_SUBSETS, "imagefolder:PATH"])


def _canonical(name: str) -> str:
    key = re.sub(r"[-_\s]", "", name.strip().lower())
    key = _ALIASES.get(key, key)
    for known in ["digits", *_TORCHVISION, "tinyimagenet", *IMAGENET_SUBSETS]:
        if key == known.replace("-", ""):
            return known
    return key


def _pixels_uint8_to_float(arr) -> torch.Tensor:
    """(N, H, W) or (N, H, W, C) uint8 array/tensor -> contiguous float32 (N, C, H, W) in [0, 1]."""
    t = torch.as_tensor(arr)
    t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
    return t.contiguous().float().div_(255.0)


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


def _list_images(folder: str) -> list[str]:
    """Image files under ``folder`` (recursive, hidden entries skipped), sorted."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(os.path.join(root, f) for f in sorted(files)
                   if not f.startswith(".") and f.lower().endswith(_IMAGE_EXTENSIONS))
    return out


_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def _decode_images(paths: Sequence[str], transform: Callable | None = None,
                   mode: str | None = None) -> np.ndarray:
    """Decode images in a thread pool into one uint8 array (N, H, W, C).

    ``mode`` forces "RGB" or "L"; ``None`` keeps gray images gray unless any image is colour.
    ``transform`` maps a PIL image to a PIL image (resizing); all outputs must share one size.
    """
    from PIL import Image

    def load(path: str):
        try:
            with Image.open(path) as img:
                m = mode or ("L" if img.mode in _GRAY_MODES else "RGB")
                out = img.convert(m)
        except Exception as err:
            raise DatasetError(f"cannot read image {path}: {type(err).__name__}: {err}; "
                               f"remove or replace the file") from None
        if transform is not None:
            out = transform(out)
        return np.asarray(out, dtype=np.uint8)

    if not paths:
        return np.zeros((0, 1, 1, 3), dtype=np.uint8)
    # Chunks, not one task per file: per-task overhead dominates for small images (32 px JPEGs);
    # PIL releases the GIL while decoding, so threads still help for large images.
    workers = max(1, min(8, os.cpu_count() or 1))
    step = max(64, math.ceil(len(paths) / (4 * workers)))
    chunks = [paths[i:i + step] for i in range(0, len(paths), step)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = [a for chunk in pool.map(lambda ps: [load(p) for p in ps], chunks) for a in chunk]
    if any(a.ndim == 3 for a in arrays) and any(a.ndim == 2 for a in arrays):
        arrays = [np.repeat(a[:, :, None], 3, axis=2) if a.ndim == 2 else a for a in arrays]
    arrays = [a[:, :, None] if a.ndim == 2 else a for a in arrays]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DatasetError(f"images have different sizes after resizing ({sorted(shapes)[:3]}); "
                           f"this is a bug in the loader's transform")
    return np.stack(arrays)


# -------------------------------------------------------------------------------------- digits

def _load_digits() -> Dataset:
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
        splits.append((_pixels_uint8_to_float(ds.data), torch.as_tensor(ds.targets).long(),
                       list(ds.classes)))
    (train_x, train_y, classes), (test_x, test_y, _) = splits
    return _make(name, train_x, train_y, test_x, test_y, mean, std, classes)


# ------------------------------------------------------------------------------- tiny imagenet

def _resize_square(size: int):
    """PIL transform: resize the shorter side to ``size``, then centre-crop ``size`` x ``size``."""
    import torchvision.transforms.functional as TF

    def transform(img):
        if img.size != (size, size):
            img = TF.center_crop(TF.resize(img, size), size)
        return img
    return transform


def _read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _load_tinyimagenet(data_path: str) -> Dataset:
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
    wnids = sorted(set(_read_lines(os.path.join(root, "wnids.txt"))))
    index = {w: i for i, w in enumerate(wnids)}

    train_paths, train_y = [], []
    for w in wnids:
        d = os.path.join(root, "train", w)
        files = _list_images(d)
        if not files:
            raise DatasetError(f"tinyimagenet: no training images in {d}; expected {layout}")
        train_paths += files
        train_y += [index[w]] * len(files)

    val_paths, val_y = [], []
    ann = os.path.join(root, "val", "val_annotations.txt")
    if os.path.isfile(ann):
        # the original layout: val/images/<file> with labels in the annotation file
        for line in _read_lines(ann):
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
            files = _list_images(os.path.join(root, "val", w))
            val_paths += files
            val_y += [index[w]] * len(files)
    if not val_paths:
        raise DatasetError(f"tinyimagenet: no validation images under {os.path.join(root, 'val')}; "
                           f"expected {layout}")

    names = list(wnids)
    words = os.path.join(root, "words.txt")
    if os.path.isfile(words):
        table = {}
        for line in _read_lines(words):
            w, _, text = line.partition("\t")
            table[w] = text.split(",")[0].strip() or w
        names = [table.get(w, w) for w in wnids]

    transform = _resize_square(64)
    train_x = _pixels_uint8_to_float(_decode_images(train_paths, transform, mode="RGB"))
    test_x = _pixels_uint8_to_float(_decode_images(val_paths, transform, mode="RGB"))
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
            wnids = [line.split()[0] for line in _read_lines(p)]
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


def _load_imagenet_subset(name: str, data_path: str) -> Dataset:
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
            files = _list_images(os.path.join(root, split, w))
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
    transform = _resize_square(128)
    train_x = _pixels_uint8_to_float(_decode_images(paths["train"][0], transform, mode="RGB"))
    test_x = _pixels_uint8_to_float(_decode_images(paths["val"][0], transform, mode="RGB"))
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
            files = _list_images(os.path.join(d, c))
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
    pixels = _decode_images(all_paths, fit, mode=None)
    n_train = len(split_files[0][0])
    train_x = _pixels_uint8_to_float(pixels[:n_train])
    test_x = _pixels_uint8_to_float(pixels[n_train:])
    del pixels
    mean, std = _channel_stats(train_x)
    name = "imagefolder:" + path
    return _make(name, train_x, split_files[0][1], test_x, split_files[1][1], mean, std, classes)


# ------------------------------------------------------------------------------------- loading

def canonical_dataset_name(name: str) -> str:
    """``imagefolder:PATH`` with PATH made absolute (so configs work from any directory);
    other names unchanged."""
    if name.startswith("imagefolder:"):
        path = name.split(":", 1)[1]
        if not path.strip():
            raise DatasetError("imagefolder: needs a path, e.g. --dataset imagefolder:data/mini "
                               "(PATH/train/<class>/*, PATH/test/<class>/*)")
        return "imagefolder:" + os.path.abspath(path)
    return name


def load_dataset(name: str, data_path: str | None = None, download: bool = True) -> Dataset:
    """Load a dataset by name (see the module docstring for the names and folder layouts).

    Args:
        name: dataset name, or ``"imagefolder:PATH"``.
        data_path: folder holding (or receiving) the files; default ``./data``. Ignored for
            ``digits`` and ``imagefolder:``. For ``tinyimagenet`` it may be the folder containing
            ``tiny-imagenet-200`` or that folder itself; for ImageNet subsets the ImageNet root with
            ``train/<wnid>/*`` and ``val/<wnid>/*``. ImageNet-1k class index i is the i-th sorted
            ``train/`` folder name, so all 1000 folders must exist, unless the root holds a
            ``wnids.txt`` (one wnid per line) or ``LOC_synset_mapping.txt`` listing the 1000 wnids
            in index order; then only the subset's folders are needed.
        download: let torchvision download MNIST/Fashion-MNIST/CIFAR if absent.

    Raises:
        DatasetError: unknown name, missing/unreadable files; the message is one line.
    """
    if not isinstance(name, str) or not name.strip():
        raise DatasetError(f"dataset name must be a non-empty string; available: "
                           f"{', '.join(available_datasets())}")
    if name.strip().lower().startswith("imagefolder:"):
        path = name.strip()[len("imagefolder:"):]
        if not path:
            raise DatasetError(f"imagefolder: needs a path, e.g. imagefolder:/data/mine with "
                               f"{_IMAGEFOLDER_LAYOUT}")
        return _load_imagefolder(path)
    key = _canonical(name)
    data_path = data_path if data_path is not None else "./data"
    if key == "digits":
        return _load_digits()
    if key in _TORCHVISION:
        return _load_torchvision(key, data_path, download)
    if key == "tinyimagenet":
        return _load_tinyimagenet(data_path)
    if key in IMAGENET_SUBSETS:
        return _load_imagenet_subset(key, data_path)
    raise DatasetError(f"unknown dataset {name!r}; available: {', '.join(available_datasets())}")
