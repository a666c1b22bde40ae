"""Training experts: :func:`train_expert` and the pools of :meth:`ExpertPool.train` and
:meth:`ExpertPool.load_or_train`, in one process or spread over several.

Contract:

* Expert k depends only on (recipe, k) and the data: its initial weights are each module's
  ``reset_parameters()`` under ``derive_seed(recipe.seed, 0x1A, k)``, its batches and
  augmentation draw from ``make_generator(recipe.seed, 0x7A, k)``. Experts can therefore be
  trained one at a time, resumed, or dealt over processes and still be the same.
* :func:`load_or_train_pool` reuses what a directory holds (``storage.cached_experts``: another
  recipe or meta is refused) and trains the rest, saving each expert and then the manifest as
  soon as it is trained. With ``world_size > 1`` (a running process group) process ``rank``
  trains the missing experts k with ``k % world_size == rank``; all wait, all load the pool,
  process 0 writes the manifest.
* Experts train on ``device``, by default where the factory builds its networks
  (:func:`factory_device`); the states kept are CPU copies.
"""
from __future__ import annotations

import math
import os
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import ExpertError
from ..heartbeat import Heartbeat
from ..seeding import derive_seed, make_generator, preserved_global_rng, reinitialize_
from ..training import accuracy, train_classifier
from ..wrapping import unwrap_network
from .pool import Expert, ExpertPool, build_network
from .recipe import ExpertRecipe, recipe_from
from .storage import cached_experts, load_expert, write_expert

_INIT_STREAM = 0x1A
_TRAIN_STREAM = 0x7A


def _state_on_cpu(module: nn.Module) -> dict[str, torch.Tensor]:
    """A contiguous CPU copy of the (unwrapped) network's state."""
    state = unwrap_network(module).state_dict()
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def describe_training(network_factory: Callable[[], nn.Module], images: torch.Tensor,
                      labels: torch.Tensor) -> dict:
    """What a pool's manifest records for a reader besides its recipe and ``meta``: the
    network's class and parameter count and the training data's shape (dataset and
    architecture names come from ``meta`` when the caller gives them)."""
    network = build_network(network_factory)
    return {"network": type(network).__name__,
            "parameters": int(sum(p.numel() for p in network.parameters())),
            "train_images": int(images.shape[0]), "image_shape": list(images.shape[1:]),
            "num_classes": int(labels.max()) + 1 if len(labels) else 0}


def factory_device(network_factory: Callable[[], nn.Module]) -> torch.device:
    """Where ``network_factory`` builds its networks (the device of its first parameter; the
    CPU for a network without parameters): experts train there unless told otherwise."""
    with preserved_global_rng():
        network = network_factory()
    first = next(iter(network.parameters()), None)
    return torch.device("cpu") if first is None else first.device


def train_expert(network_factory: Callable[[], nn.Module], images: torch.Tensor,
                 labels: torch.Tensor, *, index: int, epochs: int | None = None, seed: int = 0,
                 lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4,
                 batch_size: int = 256, lr_milestones: Sequence[int] = (),
                 lr_gamma: float = 0.1, cutmix_p: float = 0.0, augment: Callable | None = None,
                 test_images: torch.Tensor | None = None, test_labels: torch.Tensor | None = None,
                 device: str | torch.device = "cpu", progress: bool = True,
                 channels_last: bool = False, desc: str = "expert",
                 on_epoch: Callable[[int, float, float], None] | None = None,
                 recipe: ExpertRecipe | None = None) -> Expert:
    """Train expert ``index``: initial weights drawn by each module's ``reset_parameters()``
    under a seed derived from (seed, index), batches and augmentation from a generator derived
    from (seed, index). Depends on nothing else, so experts can be trained one at a time.

    The settings come as keywords (``epochs`` is then required) or as one ``recipe``."""
    if recipe is None and epochs is None:
        raise TypeError("train_expert() needs epochs= (or recipe=)")
    recipe = recipe_from(recipe, epochs=epochs, seed=seed, lr=lr, momentum=momentum,
                         weight_decay=weight_decay, batch_size=batch_size,
                         lr_milestones=lr_milestones, lr_gamma=lr_gamma, cutmix_p=cutmix_p,
                         augment=augment)
    net = build_network(network_factory)
    reinitialize_(net, derive_seed(recipe.seed, _INIT_STREAM, index))
    init_state = _state_on_cpu(net)
    net.to(device)
    train_acc = train_classifier(
        net, images, labels, epochs=recipe.epochs, lr=recipe.lr, momentum=recipe.momentum,
        weight_decay=recipe.weight_decay, batch_size=recipe.batch_size,
        lr_milestones=recipe.lr_milestones, lr_gamma=recipe.lr_gamma, cutmix_p=recipe.cutmix_p,
        augment=recipe.augment, generator=make_generator(recipe.seed, _TRAIN_STREAM, index),
        device=device, progress=progress, desc=desc, channels_last=channels_last,
        on_epoch=on_epoch)
    meta = {"index": index, "epochs": recipe.epochs, "train_accuracy": train_acc}
    if test_images is not None and test_labels is not None:
        meta["test_accuracy"] = accuracy(net, test_images, test_labels, device)
    return Expert(init_state, _state_on_cpu(net), meta)


def _accuracy_text(expert: Expert) -> str:
    acc = expert.meta.get("test_accuracy")
    return (f"test accuracy {acc:.1f}%" if acc is not None else
            f"train accuracy {expert.meta.get('train_accuracy', math.nan):.1f}%")


def train_pool(cls: type[ExpertPool], network_factory: Callable[[], nn.Module],
               images: torch.Tensor, labels: torch.Tensor, recipe: ExpertRecipe, *,
               num_experts: int, test_images: torch.Tensor | None,
               test_labels: torch.Tensor | None, device: str | torch.device | None,
               progress: bool, meta: dict | None, channels_last: bool) -> ExpertPool:
    """:meth:`ExpertPool.train`."""
    if num_experts < 1:
        raise ExpertError(f"num_experts must be >= 1, got {num_experts}")
    device = factory_device(network_factory) if device is None else device
    experts = [train_expert(network_factory, images, labels, index=k, recipe=recipe,
                            test_images=test_images, test_labels=test_labels, device=device,
                            progress=progress, channels_last=channels_last,
                            desc=f"expert {k + 1}/{num_experts}")
               for k in range(num_experts)]
    pool = cls(experts, network_factory, seed=recipe.seed,
               meta={**recipe.manifest(), **(meta or {})})
    pool.recipe = recipe
    pool._check_distinct_inits()
    return pool


def load_or_train_pool(cls: type[ExpertPool], directory: str | os.PathLike,
                       network_factory: Callable[[], nn.Module], images: torch.Tensor,
                       labels: torch.Tensor, recipe: ExpertRecipe, *, num_experts: int,
                       test_images: torch.Tensor | None, test_labels: torch.Tensor | None,
                       device: str | torch.device | None, progress: bool, meta: dict | None,
                       channels_last: bool, log: Callable[[str], None] | None, rank: int,
                       world_size: int) -> ExpertPool:
    """:meth:`ExpertPool.load_or_train`."""
    if num_experts < 1:
        raise ExpertError(f"num_experts must be >= 1, got {num_experts}")
    device = factory_device(network_factory) if device is None else device
    train = partial(train_expert, network_factory, images, labels, recipe=recipe,
                    test_images=test_images, test_labels=test_labels, device=device,
                    progress=progress, channels_last=channels_last)
    if world_size > 1:
        return _load_or_train_spread(cls, directory, network_factory, train, recipe,
                                     num_experts=num_experts, meta=meta, log=log, rank=rank,
                                     world_size=world_size)
    directory = Path(directory)
    epochs = recipe.epochs
    pool_meta, manifest, experts = cached_experts(directory, num_experts, recipe, meta, log)
    if len(experts) < num_experts and log is not None:
        log(f"experts: training {num_experts - len(experts)} of {num_experts} for {epochs} "
            f"epochs (saved to {directory} one by one)")
    pool = None
    described = describe_training(network_factory, images, labels)
    for k in range(len(experts), num_experts):
        on_epoch = None
        if log is not None and not progress:  # no bar: a line every tenth of the epochs
            beat = Heartbeat(log, f"experts: expert {k + 1}/{num_experts}, epoch", epochs,
                             every=max(1, epochs // 10), unit="epoch")
            on_epoch = (lambda e, loss, acc, beat=beat:
                        beat(e, loss=round(loss, 4), train_accuracy=round(acc, 1)))
        experts.append(train(index=k, desc=f"expert {k + 1}/{num_experts}", on_epoch=on_epoch))
        pool = cls(experts, network_factory, seed=recipe.seed, meta=pool_meta)
        pool.recipe, pool.described = recipe, described
        pool._check_distinct_inits()
        directory.mkdir(parents=True, exist_ok=True)
        pool._save_expert(directory, k)
        pool._write_manifest(directory)
        if log is not None:
            log(f"experts: expert {k} trained, {_accuracy_text(experts[k])}")
    if pool is None:
        pool = cls(experts, network_factory, seed=recipe.seed,
                   meta={**(manifest or {}).get("meta", {}), **pool_meta})
        pool.recipe = recipe
    return pool


def _load_or_train_spread(cls: type[ExpertPool], directory: str | os.PathLike,
                          network_factory: Callable[[], nn.Module],
                          train: Callable[..., Expert], recipe: ExpertRecipe, *,
                          num_experts: int, meta: dict | None,
                          log: Callable[[str], None] | None, rank: int,
                          world_size: int) -> ExpertPool:
    """:func:`load_or_train_pool` by ``world_size`` processes (see its ``rank``)."""
    from .. import distributed
    if not distributed.active(world_size):
        raise ExpertError(f"training experts with world_size={world_size} needs a running "
                          f"process group of {world_size} processes (torchrun); without "
                          f"one, leave rank and world_size at 0 and 1")
    directory = Path(directory)

    def train_mine():
        pool_meta, manifest, cached = cached_experts(directory, num_experts, recipe, meta, log)
        missing = list(range(len(cached), num_experts))
        if missing and log is not None:
            log(f"experts: training {len(missing)} of {num_experts} for {recipe.epochs} epochs, "
                f"dealt over {world_size} processes (expert k by process k % "
                f"{world_size}; saved to {directory})")
        for k in (k for k in missing if k % world_size == rank):
            expert = train(index=k, desc=f"expert {k + 1}/{num_experts}")
            directory.mkdir(parents=True, exist_ok=True)
            write_expert(directory, k, expert)
        return pool_meta, manifest, missing

    pool_meta, manifest, missing = distributed.together(train_mine)
    experts = [load_expert(directory, k) for k in range(num_experts)]
    pool = cls(experts, network_factory, seed=recipe.seed,
               meta=pool_meta if missing else {**(manifest or {}).get("meta", {}),
                                               **pool_meta})
    pool.recipe = recipe
    if missing:
        pool._check_distinct_inits()
        distributed.together(lambda: rank == 0 and pool._write_manifest(directory))
        for k in missing:
            if log is not None:
                log(f"experts: expert {k} trained by process {k % world_size}, "
                    f"{_accuracy_text(experts[k])}")
    return pool
