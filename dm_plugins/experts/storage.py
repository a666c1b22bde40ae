"""The expert pool's files: ``manifest.json`` and one ``expert_<k>.pt`` per expert.

Contract:

* ``expert_<k>.pt`` is ``{"format": FORMAT, "init": ..., "trained": ..., "meta": ...}`` (CPU
  state dicts), written atomically; loading maps to the CPU with ``weights_only=True`` and sets
  ``meta["index"] = k``. A missing or unreadable file is an :class:`ExpertError` that says to
  delete the directory.
* ``manifest.json`` is ``{"format": FORMAT, "version": 1, "num_experts", "seed", "meta",
  "experts"}`` (the pool's meta and each expert's), plus ``recipe_hash`` (the
  :meth:`~dm_plugins.experts.ExpertRecipe.digest` of the recipe the pool was trained with) and
  ``described`` (the network and the data, for a reader) when the pool has them. It is written
  after the expert files, so it only counts experts that are on disk.
* Reuse (:func:`cached_experts`) compares the recorded ``meta`` key by key with the recipe and
  meta asked for (keys a manifest lacks are not compared; the schedule keys count at their
  defaults), then the recorded ``recipe_hash`` when there is one (manifests written before it
  existed have none and are reused on their settings alone). Any difference is an
  :class:`ExpertError` naming it, never a silent retrain.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..atomic import atomic_torch_save, atomic_write_json
from ..errors import ExpertError
from .pool import Expert, ExpertPool
from .recipe import ExpertRecipe, with_schedule_defaults

MANIFEST = "manifest.json"
FORMAT = "dm_plugins.experts"
RECIPE_HASH = "recipe_hash"


def write_expert(directory: Path, k: int, e: Expert) -> None:
    """Expert ``e`` as ``directory/expert_<k>.pt``, atomically."""
    atomic_torch_save(directory / f"expert_{k}.pt",
                      {"format": FORMAT, "init": e.init_state, "trained": e.trained_state,
                       "meta": e.meta})


def load_expert(directory: Path, k: int) -> Expert:
    """Expert ``k`` of ``directory`` (on the CPU)."""
    path = directory / f"expert_{k}.pt"
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        expert = Expert(blob["init"], blob["trained"], dict(blob.get("meta", {})))
    except FileNotFoundError:
        raise ExpertError(f"expert file {path} is missing; delete {directory} to retrain the "
                          f"experts") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ExpertError(f"expert file {path} is unreadable (truncated or corrupt? "
                          f"{type(exc).__name__}); delete {directory} to retrain") from None
    expert.meta["index"] = k
    return expert


def write_manifest(directory: Path, pool: ExpertPool) -> None:
    """``pool``'s manifest in ``directory``, atomically."""
    manifest = {"format": FORMAT, "version": 1, "num_experts": len(pool), "seed": pool.seed,
                "meta": pool.meta, "experts": [e.meta for e in pool.experts]}
    if pool.recipe is not None:
        manifest[RECIPE_HASH] = pool.recipe.digest()
    if pool.described:  # for a reader, never compared on load (``meta`` is)
        manifest["described"] = pool.described
    atomic_write_json(directory / MANIFEST, manifest)


def read_manifest(directory: Path) -> dict | None:
    """The manifest of ``directory``; None when it has none."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ExpertError(f"{path} is not readable JSON ({exc}); delete the directory to "
                          f"retrain the experts") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExpertError(f"{path} is not a dm_plugins expert manifest")
    return manifest


def check_expected(directory: Path, meta: dict, expect: dict | None) -> None:
    """An :class:`ExpertError` for the first key of ``expect`` that ``meta`` records with
    another value."""
    for key, value in (expect or {}).items():
        if key in meta and meta[key] != value:
            raise ExpertError(f"the experts in {directory} were trained with {key}={meta[key]!r} "
                              f"but {key}={value!r} is asked for; use a matching directory or "
                              f"another one")


def check_recipe_hash(directory: Path, manifest: dict, recipe: ExpertRecipe) -> None:
    """An :class:`ExpertError` when ``manifest`` records a recipe hash other than
    ``recipe``'s (a manifest without one passes)."""
    stored = manifest.get(RECIPE_HASH)
    if stored is not None and stored != recipe.digest():
        raise ExpertError(f"the experts in {directory} were trained with recipe hash {stored!r} "
                          f"but the recipe asked for ({recipe.manifest()}) hashes to "
                          f"{recipe.digest()!r}; use a matching directory or another one")


def load_pool(cls: type[ExpertPool], directory: str | os.PathLike,
              network_factory: Callable[[], nn.Module], seed: int = 0,
              expect: dict | None = None) -> ExpertPool:
    """:meth:`ExpertPool.load`."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        raise ExpertError(f"no expert pool at {directory} (missing {MANIFEST}); train experts "
                          f"first (ExpertPool.load_or_train) or point to a directory written "
                          f"by ExpertPool.save")
    check_expected(directory, manifest.get("meta", {}), expect)
    experts = [load_expert(directory, k) for k in range(int(manifest.get("num_experts", 0)))]
    if not experts:
        raise ExpertError(f"{directory} holds no trained expert yet")
    return cls(experts, network_factory, seed=seed, meta=manifest.get("meta", {}))


def cached_experts(directory: Path, num_experts: int, recipe: ExpertRecipe, meta: dict | None,
                   log: Callable[[str], None] | None
                   ) -> tuple[dict, dict | None, list[Expert]]:
    """The pool's metadata (``recipe``'s settings and ``meta``), the manifest of ``directory``
    (None when it has none) and the first of its ``num_experts`` experts that it records. An
    :class:`ExpertError` for a directory of another recipe or meta, or a non-empty directory
    that is not an expert pool."""
    directory = Path(directory)
    pool_meta = {**recipe.manifest(), **(meta or {})}
    manifest = read_manifest(directory)
    if manifest is None and directory.exists() and any(directory.iterdir()):
        if not all(p.name.startswith(".") or p.name.startswith("expert_")
                   for p in directory.iterdir()):
            raise ExpertError(f"{directory} exists but holds no expert pool (no {MANIFEST}); "
                              f"point to an empty or new directory")
    experts: list[Expert] = []
    if manifest is not None:
        check_expected(directory, with_schedule_defaults(manifest.get("meta", {})),
                       with_schedule_defaults(pool_meta))
        check_recipe_hash(directory, manifest, recipe)
        have = min(int(manifest.get("num_experts", 0)), num_experts)
        experts = [load_expert(directory, k) for k in range(have)]
        if log is not None and experts:
            log(f"experts: loaded {len(experts)} from {directory}")
    return pool_meta, manifest, experts
