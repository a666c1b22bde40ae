"""The one synthetic-set file format shared by every method, plus atomic file writing helpers.

A synthetic-set file is ``torch.save`` of::

    {"format": "dm_plugins.synset", "version": 1,
     "images": float32 (N, C, H, W) in pixel space [0, 1],   # stored (possibly factorised) images
     "labels": int64 (N,),
     "meta": {"dataset", "mean", "std", "ipc", "factor", "method", "plugins", "config", "seed",
              "code_version", "num_classes", ...}}

``meta`` holds only plain Python values (dict/list/str/int/float/bool/None), so the file loads
with ``torch.load(weights_only=True)``. Files are written atomically (temp file in the same
directory, fsync, ``os.replace``): a reader never sees a half-written file.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import torch

from dm_plugins.atomic import atomic_torch_save, atomic_write_bytes, atomic_write_json

__all__ = ["SynSet", "SynSetError", "save_synset", "load_synset", "save_grid", "code_version",
           "atomic_write_json", "atomic_torch_save", "atomic_write_bytes", "REQUIRED_META",
           "FORMAT", "VERSION"]

FORMAT = "dm_plugins.synset"
VERSION = 1
REQUIRED_META = ("dataset", "mean", "std", "ipc", "factor", "method", "plugins", "config", "seed",
                 "code_version")
_PIXEL_TOL = 1e-4


class SynSetError(Exception):
    """A synthetic-set file is missing, unreadable or inconsistent (one-line message)."""


@dataclasses.dataclass
class SynSet:
    """A loaded synthetic set: pixel-space images (N, C, H, W) in [0, 1], labels (N,), metadata."""

    images: torch.Tensor
    labels: torch.Tensor
    meta: dict

    @property
    def num_classes(self) -> int:
        return int(self.meta.get("num_classes", int(self.labels.max()) + 1 if len(self.labels) else 0))


# -------------------------------------------------------------------------------- code version

@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``"<package version>+g<short commit>[.dirty]"`` when in a git checkout, else the version.

    Never raises: unknown parts become ``"unknown"``.
    """
    version = "unknown"
    try:
        import dm_plugins  # noqa: PLC0415  (optional; the package may not define __version__)
        version = str(getattr(dm_plugins, "__version__"))
    except Exception:
        try:
            from importlib.metadata import version as _dist_version
            version = _dist_version("dm_plugins")
        except Exception:
            pass
    try:
        repo = Path(__file__).resolve().parent
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                             text=True, timeout=5)
        if sha.returncode == 0 and sha.stdout.strip():
            suffix = "+g" + sha.stdout.strip()
            dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=repo,
                                   capture_output=True, timeout=10)
            if dirty.returncode == 1:
                suffix += ".dirty"
            version += suffix
    except Exception:
        pass
    return version


# ------------------------------------------------------------------------------------ save/load

def _plain(value: Any, where: str) -> Any:
    """Convert metadata to plain Python types loadable with ``weights_only=True``."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    # subclasses (torch.__version__ is a str subclass, IntEnum an int) are not loadable with
    # weights_only=True: store the plain value
    for plain in (bool, int, float, str):
        if isinstance(value, plain):
            return plain(value)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"meta key {k!r} at {where} must be a string")
            out[k] = _plain(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value), where)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        try:
            return _plain(value.item(), where)
        except Exception:
            pass
    if hasattr(value, "__dict__") and type(value).__name__ == "Namespace":  # argparse
        return _plain(vars(value), where)
    raise ValueError(f"meta value at {where} has type {type(value).__name__}; "
                     f"use plain Python types (dict/list/str/int/float/bool/None)")


def save_synset(path: str | os.PathLike, images: torch.Tensor, labels: torch.Tensor,
                meta: dict) -> None:
    """Save a synthetic set atomically in the dm_plugins format.

    Args:
        path: destination file (parent directories are created).
        images: (N, C, H, W) images in pixel space [0, 1] (values within 1e-4 outside are clamped;
            anything further out raises: denormalise first). Stored as float32 on CPU.
        labels: (N,) integer labels.
        meta: must contain ``dataset, mean, std, ipc, factor, method, plugins, config, seed``;
            ``code_version`` is filled in if missing and ``num_classes`` defaults to
            ``labels.max() + 1``. Values are converted to plain Python types (tuples become
            lists, numpy scalars become Python numbers, argparse Namespaces/dataclasses dicts).

    Raises:
        ValueError: a required meta key is missing, a value is not plain, or the tensors are
            inconsistent.
    """
    if not isinstance(meta, dict):
        raise ValueError(f"meta must be a dict, got {type(meta).__name__}")
    meta = dict(meta)
    meta.setdefault("code_version", code_version())
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"synthetic-set meta is missing required key(s): {', '.join(missing)}")
    images = torch.as_tensor(images).detach().to("cpu", torch.float32).contiguous()
    labels = torch.as_tensor(labels).detach().to("cpu")
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    labels = labels.long()
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    if images.numel():
        lo, hi = float(images.min()), float(images.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("images contain NaN or inf")
        if lo < -_PIXEL_TOL or hi > 1 + _PIXEL_TOL:
            raise ValueError(f"images must be in pixel space [0, 1], got range [{lo:.4g}, {hi:.4g}]; "
                             f"denormalise them before saving")
        images = images.clamp_(0, 1)
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError("labels must be >= 0")
    meta.setdefault("num_classes", int(labels.max()) + 1 if labels.numel() else 0)
    if labels.numel() and int(labels.max()) >= int(meta["num_classes"]):
        raise ValueError(f"labels must be < num_classes={meta['num_classes']}, "
                         f"found {int(labels.max())}")
    meta = _plain(meta, "meta")
    channels = images.shape[1]
    for key in ("mean", "std"):
        if isinstance(meta[key], list) and len(meta[key]) != channels:
            raise ValueError(f"meta[{key!r}] has {len(meta[key])} entries for {channels}-channel images")
    atomic_torch_save(path, {"format": FORMAT, "version": VERSION, "images": images,
                             "labels": labels, "meta": meta})


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def load_synset(path: str | os.PathLike) -> SynSet:
    """Load and validate a synthetic-set file written by :func:`save_synset`.

    Checks: the file exists and unpickles (``weights_only=True``), the format marker and version,
    the presence of ``images``/``labels``/``meta`` and the required meta keys, tensor dtypes and
    shapes, labels in ``[0, num_classes)``, images finite and in [0, 1] (within 1e-4), and that
    ``mean``/``std`` have one entry per channel.

    Raises:
        SynSetError: with one line saying what is wrong and what to do.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SynSetError(f"{path}: no such synthetic-set file; check the path (the distillation "
                          f"run writes it as synthetic.pt in its run directory)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise SynSetError(f"{path} is not a readable synthetic-set file (truncated or corrupt?): "
                          f"{_one_line(err)}") from None

    def bad(what: str) -> SynSetError:
        return SynSetError(f"{path}: {what}")

    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise bad(f"not a dm_plugins synthetic-set file (no format={FORMAT!r} marker); "
                  f"save synthetic sets with baselines.harness.synset.save_synset")
    version = obj.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise bad(f"format version {version!r} is newer than this code supports ({VERSION}); "
                  f"update dm_plugins")
    for key in ("images", "labels", "meta"):
        if key not in obj:
            raise bad(f"missing {key!r}; the file was not written by save_synset, re-save it")
    images, labels, meta = obj["images"], obj["labels"], obj["meta"]
    if not isinstance(meta, dict):
        raise bad(f"'meta' must be a dict, got {type(meta).__name__}; re-save the file")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise bad(f"meta is missing required key(s) {', '.join(missing)}; re-save with save_synset")
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        desc = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise bad(f"'images' must be a float (N, C, H, W) tensor, got {desc}")
    if (not isinstance(labels, torch.Tensor) or labels.is_floating_point()
            or labels.dtype == torch.bool):
        raise bad("'labels' must be an integer tensor")
    if labels.shape != (images.shape[0],):
        raise bad(f"shape mismatch: {images.shape[0]} images but labels have shape "
                  f"{tuple(labels.shape)}")
    labels = labels.long()
    images = images.float()
    num_classes = meta.get("num_classes")
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or (isinstance(num_classes, int) and hi >= num_classes):
            bound = num_classes if isinstance(num_classes, int) else "num_classes"
            raise bad(f"labels must be in [0, {bound}), found range [{lo}, {hi}]")
    if images.numel():
        if not bool(torch.isfinite(images).all()):
            raise bad("images contain NaN or inf")
        lo, hi = float(images.min()), float(images.max())
        if lo < -_PIXEL_TOL or hi > 1 + _PIXEL_TOL:
            raise bad(f"images must be in pixel space [0, 1], found range [{lo:.4g}, {hi:.4g}] "
                      f"(normalised images saved by mistake?)")
    channels = images.shape[1]
    for key in ("mean", "std"):
        value = meta[key]
        if isinstance(value, (list, tuple)) and len(value) != channels:
            raise bad(f"meta[{key!r}] has {len(value)} entries but images have {channels} channels")
    return SynSet(images=images, labels=labels, meta=meta)


# ---------------------------------------------------------------------------------------- grid

def save_grid(path: str | os.PathLike, images: torch.Tensor, labels: torch.Tensor,
              max_per_class: int = 10) -> None:
    """Write a PNG with one row per class present in ``labels`` (ascending), atomically.

    Each row shows the first ``max_per_class`` images of its class; shorter rows are padded with
    black tiles. ``images`` are pixel-space (N, C, H, W) in [0, 1]. The PNG is
    ``rows * (H + 2) + 2`` pixels high and ``cols * (W + 2) + 2`` wide (2 px padding), where
    ``cols = min(max_per_class, largest class count)``.
    """
    from torchvision.utils import make_grid, save_image

    images = torch.as_tensor(images).detach().to("cpu", torch.float32)
    labels = torch.as_tensor(labels).detach().to("cpu").long()
    if images.ndim != 4 or labels.shape != (images.shape[0],) or images.shape[0] == 0:
        raise ValueError(f"need non-empty images (N, C, H, W) and labels (N,), got "
                         f"{tuple(images.shape)} and {tuple(labels.shape)}")
    if max_per_class < 1:
        raise ValueError("max_per_class must be >= 1")
    classes = torch.unique(labels).tolist()
    rows = [images[labels == c][:max_per_class] for c in classes]
    cols = max(r.shape[0] for r in rows)
    tiles = []
    for r in rows:
        tiles.append(r)
        if r.shape[0] < cols:
            tiles.append(images.new_zeros((cols - r.shape[0],) + tuple(images.shape[1:])))
    grid = make_grid(torch.cat(tiles).clamp(0, 1), nrow=cols, padding=2)
    buf = io.BytesIO()
    save_image(grid, buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
