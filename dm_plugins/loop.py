"""The minimal DM loop: the reference host for the hooks (``docs/methods.md#dm``).

With no plugins it is exactly DM (Zhao & Bilen, 2023): every iteration a freshly initialised
random network; per class the real batch and the synthetic images get the same (Siamese)
augmentation; loss ``sum_c || mean f(real_c) - mean f(syn_c) ||^2`` (sum over feature
dimensions); one SGD step on the synthetic images.

It computes all classes in one batch rather than class by class (the original code's loop):
one augmentation call for the synthetic images of every class and one for the real images of
every class (or of each block of classes, when there are more real images than ``real_block``),
each drawing one parameter set per class from identically seeded generators, so class c's real
and synthetic images share a transform exactly as in the per-class loop; forwards of the real
images without a graph, in chunks; one forward/backward of all synthetic images (in
checkpointed chunks). The per-class loss terms are unchanged, so the loss and gradient equal the
per-class computation (tested against :func:`dm_plugins.reference.naive_dm_loss`).

The pieces every host shares (the run loop, the checkpoint part of the synthetic set, argument
checks, class-shard helpers) are :mod:`dm_plugins.synthetic`'s.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

import torch
from torch import nn

from .chunking import (checkpointed_forward, chunk_for, chunked_class_sums, chunked_features,
                       default_real_block, default_real_chunk, default_syn_chunk)
from .context import DistillContext
from .experts import build_network
from .data import ClassIndexedData
from .distributed import ClassShard
from .manager import PluginSet
from .named_losses import merge_losses
from .profiling import StageTimer
from .seeding import derive_seed, make_generator, reinitialize_
from .synthetic import (check_batch_independent, check_host_args, restore_synthetic,
                        run_iterations, shard_classes, sum_over_shards, synthetic_state,
                        with_real_kept)

_NET_STREAM, _REAL_STREAM, _AUG_STREAM = 0x4E, 0x5E, 0xA6

Augment = Callable[..., torch.Tensor]
"""``augment(images, groups, generator)``: Siamese augmentation, one parameter draw per group
id (0..G-1); the draws must depend only on the generator state and the group ids present, not
on how many images each group has (the DSA in ``baselines/harness/dsa.py`` satisfies this).
When the images passed hold only some of the C classes (a class-sharded host, ``shard=``, or a
dataset with more real images an iteration than ``real_block``) the host calls
``augment(images, groups, generator, num_groups=C)``: the draws must then be made for all C
groups and picked by group id, so that a class gets the same draw whichever other classes the
call holds (``DSA.siamese`` accepts ``num_groups``)."""

Decode = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``decode(stored, labels) -> (images, labels)``: e.g. factorisation; identity when None."""


#: What DMHost gives plugins (:attr:`DistillContext.offers`): its matching network of iteration
#: t, passed to ``dm_auxiliary_loss`` (``plm --plm-logits extractor``). It batches every class's
#: real images in one pass, so it offers no per-class real batch, and it makes one image step.
OFFERS = frozenset({"extractor"})


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, D) mean feature of each class (rows of absent classes are 0)."""
    sums = features.new_zeros(num_classes, features.shape[1]).index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1)
    return sums / counts.unsqueeze(1).to(sums)


class DMHost:
    """Distribution matching over class-indexed real data, hosting dm_plugins hooks.

    Args:
        real: class-indexed real data (normalised), see :class:`dm_plugins.data.ClassIndexedData`.
        network_factory: ``() -> nn.Module`` with an ``embed(x)`` method (features to match).
        syn_init: (C * ipc, C_img, H, W) stored synthetic images (normalised), sorted by class.
        num_iterations: T.
        plugins: a :class:`PluginSet` (None = plain DM).
        augment: Siamese augmentation (see :data:`Augment`), None for none.
        decode: stored -> training images (see :data:`Decode`), None for identity.
        batch_real: real images per class per iteration (fewer if a class is smaller).
        lr, momentum: the image optimiser (DM: SGD lr 1.0, momentum 0.5).
        seed: every random draw of iteration t derives from (seed, t), so a resumed run equals
            an uninterrupted one.
        channels_last: run the extractor in channels-last memory format (faster convolutions
            and pooling on CPU; same numbers up to float rounding, tested).
        compile_real: ``torch.compile`` the real-image forward (no graph; the largest cost of
            an iteration). Pays a one-off compile time; same numbers up to float rounding.
        compile_syn: ``torch.compile`` the synthetic-image forward (with graph, so its backward
            too), chunks included. Same terms as ``compile_real``; the two share one compiled
            ``embed`` per network (graphs with and without autograd are compiled apart).
        real_chunk: the real forward runs in chunks of at most this many images, fused with
            the class-mean accumulation, so the activations of all real images are never held
            at once and memory does not grow with the number of classes (CIFAR-100: 25,600
            real images an iteration). None: :func:`default_real_chunk` for the device (small
            chunks are also faster on CPU: the activations stay in cache). Networks whose
            forward couples the images of a batch (BatchNorm in training mode) are run on the
            whole real batch at once instead, so chunking never changes the result.
        real_block: the real images of an iteration are drawn, augmented and forwarded in
            blocks of whole classes of at most this many images (at least one class), their
            features folded into class sums block by block, so an iteration's memory does not
            grow with the number of classes. None: :func:`dm_plugins.chunking.default_real_block`
            (4,096 on CPU: CIFAR-10 at 256 images per class is one block, CIFAR-100 seven).
            Same result: augmentation draws are made for every class and picked by class (see
            :data:`Augment`). Networks with BatchNorm in training mode get one block.
        syn_chunk: the synthetic forward (with graph) runs in chunks of at most this many images
            under activation checkpointing (:func:`dm_plugins.chunking.checkpointed_forward`):
            memory for one chunk's activations instead of all, for one extra forward. None:
            :func:`dm_plugins.chunking.default_syn_chunk` (128 on CPU, off on CUDA). Same
            result up to float rounding.
        stage_timer: a :class:`dm_plugins.profiling.StageTimer` to time the stages of each
            iteration (benchmarks); None times nothing and adds no synchronisation.
        shard: a :class:`dm_plugins.distributed.ClassShard`: this host optimises only the
            shard's classes (``syn_init`` then holds only their images, sorted by class) and
            keeps the single-process random draws of every iteration (module
            :mod:`dm_plugins.distributed` states the contract); the logged losses and
            ``real_kept`` are summed over the ranks. ``real`` may hold every class or only the
            shard's (:class:`dm_plugins.distributed.ShardedClassData`). None: all classes.
    """

    def __init__(self, real: ClassIndexedData, network_factory: Callable[[], nn.Module],
                 syn_init: torch.Tensor, *, num_iterations: int, plugins: PluginSet | None = None,
                 augment: Augment | None = None, decode: Decode | None = None,
                 batch_real: int = 256, lr: float = 1.0, momentum: float = 0.5, seed: int = 0,
                 device: str | torch.device = "cpu", channels_last: bool = False,
                 compile_real: bool = False, compile_syn: bool = False,
                 real_chunk: int | None = None, real_block: int | None = None,
                 syn_chunk: int | None = None, stage_timer: StageTimer | None = None,
                 extra: dict | None = None, shard: ClassShard | None = None):
        self.real = real
        self.num_classes = int(real.num_classes)
        self.device = torch.device(device)
        real_chunk = default_real_chunk(self.device) if real_chunk is None else real_chunk
        syn_chunk = default_syn_chunk(self.device) if syn_chunk is None else syn_chunk
        real_block = default_real_block(self.device) if real_block is None else real_block
        self.shard = shard
        self.classes = shard_classes("DMHost", shard, self.num_classes)
        self.ipc = check_host_args("DMHost", syn_init, len(self.classes), positive={
            "num_iterations": num_iterations, "batch_real": batch_real, "real_chunk": real_chunk,
            "real_block": real_block, "syn_chunk": syn_chunk})
        self.num_iterations = int(num_iterations)
        self.plugins = plugins if plugins is not None else PluginSet()
        self.augment = augment
        self.decode = decode
        self.batch_real = int(batch_real)
        self.seed = int(seed)
        self.extra = dict(extra or {})
        self.syn = syn_init.detach().clone().to(self.device).requires_grad_(True)
        self.syn_labels = torch.arange(self.classes.start, self.classes.stop,
                                       device=self.device).repeat_interleave(self.ipc)
        self.optimizer = torch.optim.SGD([self.syn], lr=lr, momentum=momentum)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.extractor = build_network(network_factory).to(self.device).train().requires_grad_(False)
        self.extractor.to(memory_format=self.memory_format)
        if shard is not None:
            check_batch_independent("DMHost", self.extractor)
        self.compile_real = bool(compile_real)
        self.compile_syn = bool(compile_syn)
        self._compiled: dict[nn.Module, Callable] = {}
        self.real_chunk = int(real_chunk)
        self.real_block = int(real_block)
        self.syn_chunk = int(syn_chunk)
        self.stage = stage_timer if stage_timer is not None else StageTimer(enabled=False)
        self.iteration = 0
        self._set_up = False

    # -- pieces of one iteration ----------------------------------------------------------
    def prepare_extractor(self, t: int) -> nn.Module:
        """The extractor of iteration t: a plugin's (``ptm``), else DM's own policy, a fresh
        random draw of the host's network seeded by (seed, t)."""
        self._ensure_setup()
        return self.plugins.extractor(t, fallback=lambda: reinitialize_(
            self.extractor, derive_seed(self.seed, _NET_STREAM, t)))

    def _embedding(self, net: nn.Module, compiled: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        """``net.embed``, or its ``torch.compile`` (made once per network) when ``compiled``."""
        if not compiled:
            return net.embed
        if net not in self._compiled:
            self._compiled[net] = torch.compile(net.embed)
        return self._compiled[net]

    def real_class_blocks(self, net: nn.Module) -> list[range]:
        """The host's classes in blocks of at most ``real_block`` real images (whole classes,
        at least one a block), or one block when ``net`` couples a batch's images."""
        per_block = max(1, chunk_for(net, self.real_block) // self.batch_real)
        first, stop = self.classes.start, self.classes.stop
        return [range(c, min(c + per_block, stop)) for c in range(first, stop, per_block)]

    def real_batches(self, t: int, blocks: list[range]
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, range]]:
        """The real batches of iteration t, one block of classes at a time: ``(images, labels,
        block)``. Every class's batch is drawn in class order from one generator, whatever the
        blocks, so a sharded or blocked host's classes get the single-process batches (the
        batches of classes in no block are drawn and dropped); a block is drawn only when the
        previous one has been consumed."""
        g = make_generator(self.seed, _REAL_STREAM, t)
        next_class = 0
        for block in blocks:
            pending = []
            for c in range(next_class, block.stop):
                batch = self.real.sample(c, self.batch_real, g)
                if c >= block.start:
                    pending.append(batch)
            next_class = block.stop
            labels = torch.cat([torch.full((b.shape[0],), c, dtype=torch.long)
                                for c, b in zip(block, pending)])
            yield torch.cat(pending).to(self.device), labels.to(self.device), block

    def real_batch(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The real batches of iteration t of all the host's classes at once, concatenated,
        and their labels (what :meth:`real_batches` yields for one block)."""
        images, labels, _ = next(self.real_batches(t, [self.classes]))
        return images, labels

    def synthetic_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoded synthetic images (with graph to the stored ones) and their labels."""
        if self.decode is None:
            return self.syn, self.syn_labels
        return self.decode(self.syn, self.syn_labels)

    def _augment(self, x: torch.Tensor, groups: torch.Tensor, t: int,
                 classes: range) -> torch.Tensor:
        """Iteration t's Siamese draw for images of ``classes`` (see :data:`Augment`)."""
        if self.augment is not None:
            g = make_generator(self.seed, _AUG_STREAM, t)
            x = (self.augment(x, groups, g) if len(classes) == self.num_classes else
                 self.augment(x, groups, g, num_groups=self.num_classes))
        return x.contiguous(memory_format=self.memory_format)

    def compute_loss(self, t: int) -> tuple[torch.Tensor, dict]:
        """Build iteration t's total loss (matching + auxiliary) and its metrics; no step."""
        stage = self.stage
        with stage("extractor"):
            net = self.prepare_extractor(t)
        with stage("synthetic_forward"):
            syn, syn_labels = self.synthetic_batch()
            syn_aug = self._augment(syn, syn_labels, t, self.classes)
            syn_features = checkpointed_forward(self._embedding(net, self.compile_syn), syn_aug,
                                                chunk_for(net, self.syn_chunk))

        embed, chunk = self._embedding(net, self.compile_real), chunk_for(net, self.real_chunk)
        real_sums, counts = None, torch.zeros(self.num_classes, dtype=torch.long,
                                              device=self.device)
        drawn = 0
        holds_features = self.plugins.filters_real or self.plugins.uses_feature_loss
        feature_parts: dict[str, torch.Tensor] = {}
        batches = self.real_batches(t, self.real_class_blocks(net))
        while True:
            with stage("real_batch"):
                item = next(batches, None)
            if item is None:
                break
            real, labels, block = item
            drawn += labels.numel()
            with torch.no_grad():
                with stage("augment_real"):
                    real_aug = self._augment(real, labels, t, block)
                del real
                if not holds_features:  # fused: features never held at once
                    with stage("real_forward"):
                        real_sums = chunked_class_sums(embed, real_aug, labels,
                                                       self.num_classes, chunk, real_sums)
                else:
                    with stage("real_forward"):
                        features = chunked_features(embed, real_aug, chunk)
            if holds_features:
                with stage("cap"):
                    in_block = (syn_labels >= block.start) & (syn_labels < block.stop)
                    keep = self.plugins.batched_keep_mask(
                        features, labels, syn_features[in_block], syn_labels[in_block], t)
                    features, labels = features[keep], labels[keep]
                    if real_sums is None:
                        real_sums = features.new_zeros(self.num_classes, features.shape[1])
                    real_sums.index_add_(0, labels, features)
            if self.plugins.uses_feature_loss:
                with stage("feature_losses"):
                    for c in block:
                        for name, loss in self.plugins.feature_losses(
                                c, features[labels == c], syn_features[syn_labels == c],
                                t).items():
                            feature_parts[name] = feature_parts[name] + loss \
                                if name in feature_parts else loss
            counts += torch.bincount(labels, minlength=self.num_classes)
        real_mean = real_sums / counts.clamp_min(1).unsqueeze(1).to(real_sums)
        kept = int(counts.sum())
        syn_mean = class_means(syn_features, syn_labels, self.num_classes)
        match = ((real_mean - syn_mean) ** 2).sum()

        with stage("auxiliary_losses"):
            parts = merge_losses(feature_parts, self.plugins.auxiliary_losses(
                syn_aug, syn_labels, t, extractor=net))
        total = match + sum(parts.values()) if parts else match
        sums = sum_over_shards(self.shard, {  # a sharded host: the sums over every rank
            "loss": float(total.detach()), "loss_match": float(match.detach()),
            **{f"loss_{name}": float(v.detach()) for name, v in parts.items()},
            "kept": kept, "drawn": drawn})
        return total, with_real_kept(sums)

    def step(self, t: int | None = None) -> dict:
        """Run one iteration (default: the next one) and return its metrics."""
        t = self.iteration if t is None else t
        self._ensure_setup()
        start = time.perf_counter()
        total, metrics = self.compute_loss(t)
        self.optimizer.zero_grad(set_to_none=True)
        with self.stage("backward"):
            total.backward()
        with self.stage("optimizer_step"):
            self.optimizer.step()
        self.iteration = t + 1
        metrics["iteration"] = t
        metrics["seconds"] = time.perf_counter() - start
        return metrics

    # -- the whole run --------------------------------------------------------------------
    def context(self) -> DistillContext:
        return DistillContext(num_classes=self.num_classes, ipc=self.ipc,
                              num_iterations=self.num_iterations, real=self.real,
                              extractor=self.extractor, device=self.device,
                              memory_format=self.memory_format, seed=self.seed,
                              extra=self.extra, offers=OFFERS,
                              classes=None if self.shard is None else list(self.classes))

    def _ensure_setup(self) -> None:
        if not self._set_up:
            self.plugins.setup(self.context())
            self._set_up = True

    def close(self) -> None:
        """Call the plugins' teardown (idempotent)."""
        if self._set_up:
            self.plugins.teardown()
            self._set_up = False

    def run(self, callback: Callable[[int, dict], None] | None = None,
            progress: bool = True) -> torch.Tensor:
        """Run from :attr:`iteration` to T; ``callback(t, metrics)`` after each iteration.

        Returns the stored synthetic images (detached).
        """
        return run_iterations(self, self._ensure_setup, callback, progress, desc="distill")

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume: next iteration, stored images, optimiser state (and,
        for a sharded host, its classes ``[first, last + 1]``)."""
        return synthetic_state(self, self.optimizer.state_dict())

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; a state of other classes (another shard) is refused."""
        restore_synthetic(self, state)
