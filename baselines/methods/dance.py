"""DANCE (Zhang et al., "DANCE: Dual-View Distribution Alignment for Dataset Condensation",
IJCAI 2024) as a host loop; the facts it follows are in ``docs/methods.md#idm-and-dance``.

This module is the method only: it calls no dm_plugins hook. It names the points where a hook
can go, as methods a subclass overrides (``adapters/dance.py`` does), plus :meth:`DANCE.start`
/ :meth:`DANCE.close` around a run:

* :meth:`DANCE.matching_extractor` -- the network of the inner-class step (DANCE: the middle
  model of iteration ``t``);
* :meth:`DANCE.select_real` -- which real features of a class are matched (DANCE: all);
* :meth:`DANCE.inter_class_losses` -- the named losses of the inter-class step (DANCE:
  ``{"ce": CE(trained expert(images), hard labels)}``); it also receives the inner-class
  step's network and, when :meth:`DANCE.inter_class_wants_real` says so, the class's real batch
  augmented together with the synthetic images;
* :meth:`DANCE.inter_class_lr` -- the inter-class step's learning rate when it has an image
  optimiser of its own (DANCE: None, the one shared optimiser).

The stored images live in pixel space [0, 1]; every view of them the networks see is normalised
first (the reference normalises inside its augmentation). One iteration ``t``:

1. the stored images are clamped to [0, 1];
2. the expert ``k = experts.pick(t)`` and a mixing weight ``l ~ U(0, 1)``; the middle model has
   the parameters ``l * theta_init + (1 - l) * theta_star`` of expert ``k`` (a fresh
   interpolation, never compounded);
3. inner-class view, per class ``c`` in order: ``batch_real`` real images of the class and the
   class's decoded synthetic images (at most ``batch_syn_max``, a random subset beyond that)
   get one Siamese augmentation draw (IDC's ``color_crop_cutout``: all three ops) and the loss
   ``|| mean f(real_c) - mean f(syn_c) ||^2`` through the middle model; one SGD step on the
   stored images;
4. inter-class view, ``iter_calib`` times, per class ``c``: the class's decoded synthetic images,
   a new augmentation draw, ``CE(expert_k(images), c)`` through expert ``k``'s trained weights
   (hard labels, weight 1); one SGD step. (When a subclass asks for the real batch, a new real
   batch of the class is drawn and augmented together with the synthetic images, one draw, as
   the public PTLM code does for its pseudo-label step.)

One SGD optimiser (lr ``0.01 x IPC``, momentum 0.5) holds every stored image, so both views'
per-class steps share one momentum buffer (unless :meth:`DANCE.inter_class_lr` gives the
inter-class step an optimiser of its own, with the same momentum). Every random draw comes from a generator derived
from the run seed and ``t`` (and the class or step), so a resumed run equals an uninterrupted one.

Class-sharded (``shard=``, ``torchrun --nproc-per-node K baselines/dance.py``; the contract is
:mod:`dm_plugins.distributed`'s): a process holds and optimises only its classes' stored images.
Every loss term is one class's, and each class's draws (real batch, augmentation, subset) have
their own generator, while the middle model's weight ``l`` and the expert depend only on ``t``,
so a class's terms are those of one process. The classes are still coupled through the shared
momentum buffer: each class's step moves every image by its momentum, so a process steps for
every class in order, a zero-gradient step for a class it does not hold
(:func:`dm_plugins.synthetic.image_step`). No gradient or image is exchanged; only the logged sums
(one small collective an iteration). Gathered in class order, the K processes' images equal one
process's up to float rounding. Every forward here runs on one class's images, so no batch mixes
classes (the run driver still refuses BatchNorm networks for any run of several processes).

Deliberate differences from the reference code (none changes a loss):

* Randomness is seeded (the reference draws from the global, clock-seeded generators).
* The expert of iteration ``t`` is :meth:`dm_plugins.ExpertPool.pick` (a fixed function of the
  seed and ``t``; the reference draws it uniformly at random), so PTM and PLM use the same expert
  when they replace parts of DANCE.
* No evaluation during distillation and no selection of a synthetic set by test accuracy.
* The returned set is clamped to [0, 1] once more after the last step (the reference clamps at
  the start of every iteration and evaluates what the last step left).
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dm_plugins.experts import ExpertPool
from dm_plugins.chunking import chunk_for, chunked_features, default_real_chunk
from dm_plugins.named_losses import merge_losses
from dm_plugins.distributed import ClassShard
from dm_plugins.seeding import make_generator
from dm_plugins.synthetic import (check_host_args, image_step, restore_synthetic, run_iterations,
                                  shard_classes, sum_over_shards, synthetic_state, with_real_kept)
from dm_plugins.trajectory import interpolate_parameters_

__all__ = ["DANCE", "middle_ratio"]

_MIX_STREAM = 0xDA0    # the mixing weight l of iteration t
_REAL_STREAM = 0xDA1   # the real batch of (t, class)
_AUG_STREAM = 0xDA2    # the augmentation draw of (t, view, step, class)
_SUB_STREAM = 0xDA3    # the subset of decoded synthetic images of (t, view, step, class)
_INTER_REAL_STREAM = 0xDA4  # the inter-class real batch of (t, step, class), when asked for

_INNER, _INTER = 0, 1


def middle_ratio(mix: float) -> float:
    """DANCE's middle model ``l * theta_init + (1 - l) * theta_star`` written as
    ``r * theta_star + (1 - r) * theta_init``: ``r = 1 - l``."""
    return 1.0 - mix


class DANCE:
    """DANCE over class-indexed real data (normalised) with stored images in pixel space.

    Args:
        real: class-indexed real data, normalised (:class:`dm_plugins.ClassIndexedTensors`).
        experts: the pretrained experts (initial and trained weights; the same pool PTM and
            PLM use).
        syn_init: (C * ipc, C_img, H, W) stored images in pixel space [0, 1], sorted by class.
        normalize: pixel space -> the networks' input space (differentiable), e.g.
            ``dataset.normalize``.
        num_iterations: T (reference: 10,000).
        augment: Siamese augmentation ``augment(images, groups, generator)`` applied to
            normalised images (IDC's ``color_crop_cutout``: ``DSA("color_crop_cutout").sequence``),
            or None.
        decode: stored -> matched images, ``decode(stored, labels)`` (factor-2 multi-formation),
            or None.
        batch_real: real images per class in the inner-class step (128).
        batch_syn_max: most decoded synthetic images per class in a step (200).
        lr, momentum: the image optimiser (reference: ``0.01 * ipc``, 0.5).
        iter_calib: inter-class passes per iteration (1).
        seed: all random draws derive from it.
        channels_last: networks and images in channels-last memory format.
        real_chunk: the inner-class real forward runs in chunks of at most this many images
            (None: :func:`dm_plugins.chunking.default_real_chunk`; same result, faster on CPU).
        shard: a :class:`dm_plugins.distributed.ClassShard`: optimise only its classes
            (``syn_init`` then holds only theirs, sorted by class; ``real`` may hold only their
            images, a :class:`dm_plugins.distributed.ShardedClassData`); the logged losses and
            ``real_kept`` are summed over the ranks. None: every class.
    """

    def __init__(self, real, experts: ExpertPool, syn_init: torch.Tensor, *,
                 normalize: Callable[[torch.Tensor], torch.Tensor], num_iterations: int,
                 augment=None, decode=None, batch_real: int = 128, batch_syn_max: int = 200,
                 lr: float = 0.1, momentum: float = 0.5, iter_calib: int = 1, seed: int = 0,
                 device: str | torch.device = "cpu", channels_last: bool = False,
                 real_chunk: int | None = None, extra: dict | None = None,
                 shard: ClassShard | None = None):
        self.real = real
        self.experts = experts
        real_chunk = default_real_chunk(device) if real_chunk is None else real_chunk
        self.num_classes = int(real.num_classes)
        self.shard = shard
        self.classes = shard_classes("DANCE", shard, self.num_classes)
        self.ipc = check_host_args("DANCE", syn_init, len(self.classes), positive={
            "num_iterations": num_iterations, "batch_real": batch_real,
            "batch_syn_max": batch_syn_max, "real_chunk": real_chunk}, nonnegative={"iter_calib": iter_calib})
        if len(experts) < 1:
            raise ValueError("DANCE needs at least one expert")
        self.normalize = normalize
        self.num_iterations = int(num_iterations)
        self.augment, self.decode = augment, decode
        self.batch_real, self.batch_syn_max = int(batch_real), int(batch_syn_max)
        self.iter_calib = int(iter_calib)
        self.real_chunk = int(real_chunk)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.extra = dict(extra or {})
        self.syn = syn_init.detach().clone().to(self.device).requires_grad_(True)
        self.syn_labels = torch.arange(self.classes.start, self.classes.stop,
                                       device=self.device).repeat_interleave(self.ipc)
        self.momentum = float(momentum)
        self.optimizer = torch.optim.SGD([self.syn], lr=lr, momentum=momentum)
        self._inter_optimizer: torch.optim.Optimizer | None = None
        self._middle = experts.network(self.device, self.memory_format)
        self.iteration = 0
        self._started = False

    # -- the hook points: a subclass (adapters/dance.py) overrides these -------------------
    def matching_extractor(self, t: int, middle: Callable[[], nn.Module]) -> nn.Module:
        """The network of iteration ``t``'s inner-class step. DANCE: the middle model
        (``middle()`` builds it; it is only called when needed)."""
        return middle()

    def select_real(self, label: int, real_features: torch.Tensor, syn_features: torch.Tensor,
                    t: int) -> torch.Tensor:
        """The real features of class ``label`` that are matched. DANCE: all of them."""
        return real_features

    def feature_losses(self, label: int, real_features: torch.Tensor,
                       syn_features: torch.Tensor, t: int) -> dict[str, torch.Tensor]:
        """Named losses on class ``label``'s features, added to its inner-class loss (the kept
        real features, no graph; the synthetic ones with graph). DANCE: none."""
        return {}

    def inter_class_losses(self, syn_images: torch.Tensor, syn_labels: torch.Tensor, t: int,
                           extractor: nn.Module | None = None,
                           real_images: torch.Tensor | None = None,
                           real_labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The named losses of one class's inter-class step (images decoded, augmented and
        normalised). ``extractor``: the inner-class step's network of ``t``; ``real_images``:
        the class's real batch augmented with the synthetic images' draw, when
        :meth:`inter_class_wants_real` (else None). DANCE: cross-entropy through the trained
        expert of ``t`` with the hard labels, weight 1."""
        expert = self.experts.trained_network(self.experts.pick(t), self.device,
                                              self.memory_format)
        return {"ce": F.cross_entropy(expert(syn_images), syn_labels)}

    def inter_class_wants_real(self) -> bool:
        """Whether the inter-class step draws a real batch for :meth:`inter_class_losses`.
        DANCE: no."""
        return False

    def inter_class_lr(self) -> float | None:
        """The inter-class step's own learning rate (an SGD optimiser of its own, DANCE's
        momentum), or None for the one shared optimiser. DANCE: None."""
        return None

    @property
    def inter_optimizer(self) -> torch.optim.Optimizer:
        """The optimiser of the inter-class step: the shared one, or its own (built once)."""
        lr = self.inter_class_lr()
        if lr is None:
            return self.optimizer
        if self._inter_optimizer is None:
            self._inter_optimizer = torch.optim.SGD([self.syn], lr=lr, momentum=self.momentum)
        return self._inter_optimizer

    def start(self) -> None:
        """Called once before the first iteration (idempotent)."""
        self._started = True

    def close(self) -> None:
        """Called once after the last iteration, also on errors (idempotent)."""
        self._started = False

    # -- pieces of one iteration -----------------------------------------------------------
    def mixing_weight(self, t: int) -> float:
        """DANCE's ``l ~ U(0, 1)`` of iteration ``t``."""
        return float(torch.rand((), generator=make_generator(self.seed, _MIX_STREAM, t)))

    def middle_model(self, t: int) -> nn.Module:
        """The middle model of iteration ``t``: expert ``pick(t)``'s parameters at
        ``l * theta_init + (1 - l) * theta_star``, written into one preallocated network."""
        theta_init, theta_star = self.experts.parameter_pair(self.experts.pick(t), self.device)
        interpolate_parameters_(list(self._middle.parameters()), theta_init, theta_star,
                                middle_ratio(self.mixing_weight(t)))
        return self._middle

    def synthetic_view(self, c: int, t: int, view: int, step: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class ``c``'s stored images decoded (pixel space), at most ``batch_syn_max`` of
        them (a random subset beyond that), and their labels (``c`` a class the host holds)."""
        first = (c - self.classes.start) * self.ipc
        rows = slice(first, first + self.ipc)
        images, labels = self.syn[rows], self.syn_labels[rows]
        if self.decode is not None:
            images, labels = self.decode(images, labels)
        if images.shape[0] > self.batch_syn_max:
            g = make_generator(self.seed, _SUB_STREAM, t, view, step, c)
            keep = torch.randperm(images.shape[0], generator=g)[:self.batch_syn_max]
            images, labels = images[keep.to(images.device)], labels[keep.to(labels.device)]
        return images, labels

    def _augment(self, x: torch.Tensor, c: int, t: int, view: int, step: int) -> torch.Tensor:
        if self.augment is not None:  # one Siamese group: a single draw for the whole batch
            groups = torch.zeros(x.shape[0], dtype=torch.long)
            x = self.augment(x, groups, make_generator(self.seed, _AUG_STREAM, t, view, step, c))
        return x.contiguous(memory_format=self.memory_format)

    def inner_class_loss(self, extractor: nn.Module, c: int, t: int,
                         parts: dict[str, float] | None = None
                         ) -> tuple[torch.Tensor, int, int]:
        """Class ``c``'s inner-class loss at ``t`` (matching plus :meth:`feature_losses`), real
        samples drawn and kept; ``parts``, when given, gains ``match`` and each feature loss
        by name (floats, added to what it holds)."""
        g = make_generator(self.seed, _REAL_STREAM, t, c)
        real = self.real.sample(c, self.batch_real, g).to(self.device)
        syn, _ = self.synthetic_view(c, t, _INNER, 0)
        both = self._augment(torch.cat([real, self.normalize(syn)]), c, t, _INNER, 0)
        real_aug, syn_aug = both[:real.shape[0]], both[real.shape[0]:]
        with torch.no_grad():
            real_features = chunked_features(extractor.embed, real_aug,
                                             chunk_for(extractor, self.real_chunk))
        syn_features = extractor.embed(syn_aug)
        kept = self.select_real(c, real_features, syn_features, t)
        match = ((kept.mean(0) - syn_features.mean(0)) ** 2).sum()
        extra = self.feature_losses(c, kept, syn_features, t)
        if parts is not None:
            for name, value in {"match": match, **extra}.items():
                parts[name] = parts.get(name, 0.0) + float(value.detach())
        loss = match + sum(extra.values()) if extra else match
        return loss, real.shape[0], int(kept.shape[0])

    def step(self, t: int | None = None) -> dict:
        """Run iteration ``t`` (default: the next one); return its metrics: ``loss`` (both
        views summed over classes), ``loss_match`` (inner-class), ``loss_<name>`` per
        inter-class loss (summed over classes and passes), ``mix`` (DANCE's ``l``),
        ``expert``, ``real_kept`` (sums over every class also when sharded).

        A class the host does not hold gets a zero-gradient step in its place (see the module
        docstring). A class's inter-class step is skipped when its losses are empty; a sharded
        host cannot know that of a class it does not hold, so it refuses (ValueError) empty
        inter-class losses: every class must have them (DANCE's CE, PLM's loss do)."""
        t = self.iteration if t is None else t
        self.start()
        begin = time.perf_counter()
        with torch.no_grad():
            self.syn.clamp_(0.0, 1.0)
        extractor = self.matching_extractor(t, lambda: self.middle_model(t))
        inner: dict[str, float] = {"match": 0.0}
        drawn, kept = 0, 0
        for c in range(self.num_classes):
            if c not in self.classes:
                image_step(self.optimizer, self.syn, None)
                continue
            loss, n_real, n_kept = self.inner_class_loss(extractor, c, t, inner)
            image_step(self.optimizer, self.syn, loss)
            drawn, kept = drawn + n_real, kept + n_kept
        match = inner.pop("match")
        inter: dict[str, float] = {}
        optimizer, wants_real = self.inter_optimizer, self.inter_class_wants_real()
        for step in range(self.iter_calib):
            for c in range(self.num_classes):
                if c not in self.classes:
                    image_step(optimizer, self.syn, None)
                    continue
                syn, labels = self.synthetic_view(c, t, _INTER, step)
                real_aug = real_labels = None
                if wants_real:
                    g = make_generator(self.seed, _INTER_REAL_STREAM, t, step, c)
                    real = self.real.sample(c, self.batch_real, g).to(self.device)
                    both = self._augment(torch.cat([real, self.normalize(syn)]), c, t, _INTER,
                                         step)
                    real_aug, syn_aug = both[:real.shape[0]], both[real.shape[0]:]
                    real_labels = torch.full((real.shape[0],), c, dtype=torch.long,
                                             device=self.device)
                else:
                    syn_aug = self._augment(self.normalize(syn), c, t, _INTER, step)
                losses = self.inter_class_losses(syn_aug, labels, t, extractor, real_aug,
                                                 real_labels)
                if not losses:
                    if self.shard is not None:
                        raise ValueError(f"DANCE: class {c} has no inter-class loss; a "
                                         f"class-sharded host needs one for every class")
                    continue
                image_step(optimizer, self.syn, sum(losses.values()))
                for name, value in losses.items():
                    inter[name] = inter.get(name, 0.0) + float(value.detach())
        named = merge_losses(inner, inter)   # feature losses of the inner step, then inter
        sums = sum_over_shards(self.shard, {
            "loss_match": match, **{f"loss_{name}": v for name, v in named.items()},
            "kept": kept, "drawn": drawn})
        metrics = {"loss": sums["loss_match"] + sum(sums[f"loss_{name}"] for name in named),
                   **with_real_kept(sums)}
        metrics["mix"] = self.mixing_weight(t)
        metrics["expert"] = self.experts.pick(t)
        self.iteration = t + 1
        metrics["iteration"] = t
        metrics["seconds"] = time.perf_counter() - begin
        return metrics

    # -- the whole run ---------------------------------------------------------------------
    def run(self, callback: Callable[[int, dict], None] | None = None,
            progress: bool = True) -> torch.Tensor:
        """Run from :attr:`iteration` to T; ``callback(t, metrics)`` after each iteration.
        Returns the stored images in pixel space, clamped to [0, 1] (detached)."""
        run_iterations(self, self.start, callback, progress, desc="distill (dance)")
        return self.syn.detach().clamp(0.0, 1.0)

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume: next iteration, stored images and the image
        optimiser's state (the experts are read-only and saved elsewhere); a sharded host's
        also names its classes, and :meth:`load_state_dict` refuses another shard's. With an
        inter-class optimiser of its own, its state too (``inter_optimizer``)."""
        state = synthetic_state(self, self.optimizer.state_dict())
        if self.inter_class_lr() is not None:
            state["inter_optimizer"] = self.inter_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        own = self.inter_class_lr() is not None
        if own != ("inter_optimizer" in state):
            raise ValueError("the checkpoint's inter-class step " +
                             ("shares the image optimiser" if own else "has its own optimiser")
                             + ", this run's " +
                             ("has its own" if own else "shares it"))
        restore_synthetic(self, state)
        if own:
            self.inter_optimizer.load_state_dict(state["inter_optimizer"])
