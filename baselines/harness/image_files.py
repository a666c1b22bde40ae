"""Reading image files from disk, the part of dataset loading that knows nothing of datasets.

Contract: every function here takes paths (or arrays) and returns plain uint8 ``numpy`` arrays,
float32 tensors or lists; none knows a dataset's name, classes or normalisation (that is
:mod:`baselines.harness.dataset_loaders`). ``list_images`` is deterministic (sorted, hidden
entries skipped); ``decode_images`` reads in a thread pool, keeps the input order, and raises
:class:`~baselines.harness.datasets.DatasetError` with a one-line message for an unreadable file.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
import torch

from .datasets import DatasetError

__all__ = ["IMAGE_EXTENSIONS", "list_images", "decode_images", "resize_square", "read_lines",
           "pixels_uint8_to_float"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm", ".pbm")


def pixels_uint8_to_float(arr) -> torch.Tensor:
    """(N, H, W) or (N, H, W, C) uint8 array/tensor -> contiguous float32 (N, C, H, W) in [0, 1]."""
    t = torch.as_tensor(arr)
    t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
    return t.contiguous().float().div_(255.0)


def list_images(folder: str) -> list[str]:
    """Image files under ``folder`` (recursive, hidden entries skipped), sorted."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(os.path.join(root, f) for f in sorted(files)
                   if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))
    return out


_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def decode_images(paths: Sequence[str], transform: Callable | None = None,
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


def resize_square(size: int):
    """PIL transform: resize the shorter side to ``size``, then centre-crop ``size`` x ``size``."""
    import torchvision.transforms.functional as TF

    def transform(img):
        if img.size != (size, size):
            img = TF.center_crop(TF.resize(img, size), size)
        return img
    return transform


def read_lines(path: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]
