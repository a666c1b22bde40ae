"""Experts for PTM/PLM: trained once per (dataset, architecture, epochs, seed, recipe), cached
on disk, reused by every run and every baseline.

A named recipe (:data:`RECIPES`) becomes one :class:`dm_plugins.experts.ExpertRecipe`
(:func:`expert_recipe`); the pool's manifest records its settings and its hash, and reuse
checks both. The cache directory keeps its readable name (:func:`cache_key`), so directories
written before the hash existed are found and reused as they are."""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable

import torch

from dm_plugins import ExpertPool
from dm_plugins.experts import MANIFEST, ExpertRecipe

from .datasets import Dataset
from .dsa import DSA, idc_per_image
from .networks import get_network

DEFAULT_CACHE_ROOT = "experts"
CACHE_ENV = "DM_PLUGINS_EXPERTS"

RECIPES = {
    "ptlm": "SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 256, constant lr, per-image "
            "DSA (PTLM's experts)",
    "dance": "SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 64, lr x0.2 at 2/3 and 5/6 "
             "of the epochs, per-image colour then crop (IDC's augmentation), CutMix p 0.5 "
             "(DANCE's experts)",
}
"""The expert recipes by name (``--expert-recipe``); the cache key names the recipe."""
DEFAULT_RECIPE = "dance"
"""The recipe of every command-line host unless ``--expert-recipe`` says otherwise: on the
CIFAR-10 subset (10k images, 2 experts) DANCE's recipe gave 67.5 % mean test accuracy in 12
epochs against 62.9 % for PTLM's in 15 epochs, at no more CPU time
(``benchmarks/expert_recipes.py``; docs/results.md)."""
_UNSUFFIXED = "ptlm"  # the first recipe; its cache directories predate recipe names


def recipe_arguments(name: str, epochs: int, dataset: Dataset) -> dict:
    """The :meth:`dm_plugins.ExpertPool.load_or_train` keywords of recipe ``name``."""
    if name == "ptlm":
        augment = DSA(flip=not dataset.is_digit_like)
        return {"batch_size": 256, "augment": augment.per_image, "augment_name": "dsa"}
    if name == "dance":
        return {"batch_size": 64, "lr_milestones": (2 * epochs // 3, 5 * epochs // 6),
                "lr_gamma": 0.2, "cutmix_p": 0.5, "augment": idc_per_image("color_crop"),
                "augment_name": "idc-color-crop"}
    raise ValueError(f"unknown expert recipe {name!r}; choose from {', '.join(RECIPES)}")


def expert_recipe(name: str, epochs: int, seed: int, dataset: Dataset) -> ExpertRecipe:
    """Recipe ``name`` for ``epochs`` epochs and training seed ``seed``, as the
    :class:`~dm_plugins.experts.ExpertRecipe` the pool is trained with, recorded and hashed."""
    return ExpertRecipe(epochs=epochs, seed=seed, **recipe_arguments(name, epochs, dataset))


def cache_key(dataset: str, arch: str, epochs: int, seed: int,
              recipe: str = DEFAULT_RECIPE) -> str:
    """A readable directory name for the cache entry (paths are shortened to a hash), with a
    ``-<recipe>`` suffix for any recipe but ``ptlm`` (whose directories predate recipes). The
    number of experts is not part of it: a cache grows expert by expert. Nor is the recipe's
    hash: (recipe name, epochs, seed) fix the recipe, and the manifest records its settings and
    hash, checked on reuse, so directories named before the hash existed are still found."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", dataset).strip("-").lower()
    if dataset.startswith("imagefolder:"):
        path = os.path.abspath(dataset.split(":", 1)[1])
        slug = f"imagefolder-{Path(path).name}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"
    suffix = "" if recipe == _UNSUFFIXED else f"-{recipe}"
    return f"{slug}-{arch}-e{epochs}-s{seed}{suffix}"


def default_cache_dir(dataset: str, arch: str, epochs: int, seed: int,
                      recipe: str = DEFAULT_RECIPE) -> Path:
    root = Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE_ROOT))
    return root / cache_key(dataset, arch, epochs, seed, recipe)


def experts_directory(config: dict) -> Path:
    """The expert directory a run of resolved ``config`` uses: ``config["experts"]`` when
    given, else the default cache entry of its dataset, architecture, epochs, expert seed and
    recipe. The driver trains and loads a run's pool there; the ablation runner asks it
    whether a pool is already cached."""
    if config.get("experts") is not None:
        return Path(config["experts"])
    return default_cache_dir(config["dataset"], config["arch"], config["expert_epochs"],
                             config.get("expert_seed", config["seed"]),
                             config.get("expert_recipe", "ptlm"))


def cached_expert_count(directory: str | Path) -> int:
    """How many experts the pool in ``directory`` records as finished (0 when it has no
    readable manifest). It reads the manifest only; loading checks the rest."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
        return max(0, int(manifest.get("num_experts", 0)))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def load_or_train_experts(dataset: Dataset, arch: str, *, num_experts: int, epochs: int,
                          seed: int, directory: str | Path | None = None,
                          recipe: str = DEFAULT_RECIPE,
                          device: torch.device = torch.device("cpu"), progress: bool = True,
                          channels_last: bool = False, log: Callable[[str], None] = print,
                          rank: int = 0, world_size: int = 1) -> tuple[ExpertPool, Path]:
    """The first ``num_experts`` experts of ``directory`` (or the default cache entry), training
    and saving the missing ones first with :meth:`dm_plugins.ExpertPool.load_or_train` with
    the named ``recipe`` (see :data:`RECIPES`; resumable expert by expert). In a run of
    several processes every process calls this; ``rank`` / ``world_size`` deal the missing
    experts over them (see :meth:`~dm_plugins.ExpertPool.load_or_train`).

    A directory holding experts for another dataset, architecture, class count or recipe
    raises :class:`ExpertError` (never a silent retrain).
    """
    def factory():
        return get_network(arch, dataset.channels, dataset.num_classes, dataset.image_size)

    training = expert_recipe(recipe, epochs, seed, dataset)
    path = Path(directory) if directory is not None else default_cache_dir(
        dataset.name, arch, epochs, seed, recipe)
    pool = ExpertPool.load_or_train(
        path, factory, dataset.train.images, dataset.train.labels, num_experts=num_experts,
        recipe=training, test_images=dataset.test.images, test_labels=dataset.test.labels,
        device=device, progress=progress, channels_last=channels_last,
        meta={"dataset": dataset.name, "arch": arch, "num_classes": dataset.num_classes},
        log=log, rank=rank, world_size=world_size)
    log(f"experts: {len(pool)} x {arch} ({pool.describe()}), mean test accuracy "
        f"{pool.mean_test_accuracy():.2f}% "
        f"({', '.join(format(e.meta.get('test_accuracy', float('nan')), '.1f') for e in pool.experts)})")
    return pool, path
