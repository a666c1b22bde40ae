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

This module is the public face and the registry: each name above but ``imagefolder:PATH`` is
registered once, by the ``@register_dataset(...)`` decorator on its loader in
:mod:`baselines.harness.dataset_loaders` (imported on first use of the registry), and
:func:`available_datasets` lists the registry in registration order, then ``imagefolder:PATH``.
Reading image files is :mod:`baselines.harness.image_files`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from dm_plugins.data import ClassIndexedTensors

__all__ = ["Dataset", "DatasetError", "load_dataset", "available_datasets", "IMAGENET_SUBSETS",
           "register_dataset"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IMAGENET_SUBSETS: dict[str, list[int]] = {
    "imagenette": [0, 217, 482, 491, 497, 566, 569, 571, 574, 701],
    "imagewoof": [193, 182, 258, 162, 155, 167, 159, 273, 207, 229],
    "imagemeow": [281, 282, 283, 284, 285, 291, 292, 290, 289, 287],
    "imagesquawk": [84, 130, 88, 144, 145, 22, 96, 9, 100, 89],
    "imagefruit": [953, 954, 949, 950, 951, 957, 952, 945, 943, 948],
    "imageyellow": [309, 986, 954, 951, 987, 779, 599, 291, 72, 11],
}

_DIGIT_LIKE = ("digits", "mnist", "fashion-mnist")
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


# ------------------------------------------------------------------------------------ registry

Loader = Callable[[str, str, bool], Dataset]
"""``loader(name, data_path, download) -> Dataset`` for one of the canonical names it was
registered under."""

_LOADERS: dict[str, Loader] = {}


def register_dataset(*names: str) -> Callable[[Loader], Loader]:
    """Decorator: ``loader`` loads each of the canonical ``names`` (lower case; ``-`` allowed,
    e.g. ``"fashion-mnist"``). A name registered twice is a ``ValueError``."""
    def decorate(loader: Loader) -> Loader:
        for name in names:
            if name in _LOADERS:
                raise ValueError(f"dataset {name!r} is registered twice")
            _LOADERS[name] = loader
        return loader
    return decorate


def _registry() -> dict[str, Loader]:
    """The registered loaders by canonical name, in registration order."""
    from . import dataset_loaders  # noqa: F401 - its @register_dataset decorators fill _LOADERS
    return _LOADERS


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset` (``imagefolder:PATH`` takes any folder path)."""
    return [*_registry(), "imagefolder:PATH"]


def _canonical(name: str) -> str:
    key = re.sub(r"[-_\s]", "", name.strip().lower())
    key = _ALIASES.get(key, key)
    for known in _registry():
        if key == known.replace("-", ""):
            return known
    return key


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
        from .dataset_loaders import _load_imagefolder
        return _load_imagefolder(path)
    key = _canonical(name)
    data_path = data_path if data_path is not None else "./data"
    loader = _registry().get(key)
    if loader is not None:
        return loader(key, data_path, download)
    raise DatasetError(f"unknown dataset {name!r}; available: {', '.join(available_datasets())}")
