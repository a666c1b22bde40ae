"""Experts for PTM/PLM: trained once per (dataset, architecture, epochs, seed), cached on disk,
reused by every run and every baseline."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Callable

import torch

from dm_plugins import ExpertError, ExpertPool

from .datasets import Dataset
from .dsa import DSA
from .networks import get_network

DEFAULT_CACHE_ROOT = "experts"
CACHE_ENV = "DM_PLUGINS_EXPERTS"


def cache_key(dataset: str, arch: str, epochs: int, seed: int, num_experts: int) -> str:
    """A readable directory name for the cache entry (paths are shortened to a hash)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", dataset).strip("-").lower()
    if dataset.startswith("imagefolder:"):
        path = os.path.abspath(dataset.split(":", 1)[1])
        slug = f"imagefolder-{Path(path).name}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"
    return f"{slug}-{arch}-e{epochs}-s{seed}-n{num_experts}"


def default_cache_dir(dataset: str, arch: str, epochs: int, seed: int, num_experts: int) -> Path:
    root = Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE_ROOT))
    return root / cache_key(dataset, arch, epochs, seed, num_experts)


def load_or_train_experts(dataset: Dataset, arch: str, *, num_experts: int, epochs: int,
                          seed: int, directory: str | Path | None = None,
                          device: torch.device = torch.device("cpu"), progress: bool = True,
                          channels_last: bool = False, log: Callable[[str], None] = print) -> tuple[ExpertPool, Path]:
    """Load the experts from ``directory`` (or the default cache entry), training and saving
    them first if the directory holds none.

    A directory holding experts for another dataset, architecture or class count raises
    :class:`ExpertError` (never a silent retrain).
    """
    def factory():
        return get_network(arch, dataset.channels, dataset.num_classes, dataset.image_size)

    path = Path(directory) if directory is not None else default_cache_dir(
        dataset.name, arch, epochs, seed, num_experts)
    expect = {"dataset": dataset.name, "arch": arch, "num_classes": dataset.num_classes}
    if (path / "manifest.json").exists():
        pool = ExpertPool.load(path, factory, seed=seed, expect=expect)
        if len(pool) < num_experts:
            raise ExpertError(f"{path} holds {len(pool)} experts but {num_experts} were asked "
                              f"for; lower --num-experts or use another --experts directory")
        pool.experts = pool.experts[:num_experts]
        log(f"experts: loaded {len(pool)} from {path} ({pool.describe()})")
        return pool, path
    if path.exists() and any(path.iterdir()):
        raise ExpertError(f"{path} exists but holds no expert pool (no manifest.json); point "
                          f"--experts to an empty or new directory")
    log(f"experts: training {num_experts} x {arch} for {epochs} epochs on {dataset.name} "
        f"(cached at {path})")
    augment = DSA(flip=not dataset.is_digit_like)
    pool = ExpertPool.train(
        factory, dataset.train.images, dataset.train.labels, num_experts=num_experts,
        epochs=epochs, seed=seed, augment=augment.per_image, test_images=dataset.test.images,
        test_labels=dataset.test.labels, device=device, progress=progress, meta=expect,
        channels_last=channels_last)
    pool.save(path)
    log(f"experts: mean test accuracy {pool.mean_test_accuracy():.2f}% "
        f"({', '.join(format(e.meta['test_accuracy'], '.1f') for e in pool.experts)})")
    return pool, path
