"""The minimal DM loop: the reference host for the hooks (DESIGN.md 2.1).

With no plugins it is exactly DM (Zhao & Bilen, 2023): every iteration a freshly initialised
random network; per class the real batch and the synthetic images get the same (Siamese)
augmentation; loss ``sum_c || mean f(real_c) - mean f(syn_c) ||^2`` (sum over feature
dimensions); one SGD step on the synthetic images.

It computes all classes in one batch rather than class by class (the original code's loop):
one augmentation call for the real images of every class and one for the synthetic images, each
drawing one parameter set per class from identically seeded generators, so class c's real and
synthetic images share a transform exactly as in the per-class loop; one forward of all real
images without a graph; one forward/backward of all synthetic images. The per-class loss terms
are unchanged, so the loss and gradient equal the per-class computation (tested against
:func:`dm_plugins.reference.naive_dm_loss`).
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from .context import DistillContext
from .data import ClassIndexedData
from .manager import PluginSet
from .seeding import derive_seed, make_generator, reinitialize_

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

_NET_STREAM, _REAL_STREAM, _AUG_STREAM = 0x4E, 0x5E, 0xA6

Augment = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]
"""``augment(images, groups, generator)``: Siamese augmentation, one parameter draw per group
id (0..G-1); the draws must depend only on the generator state and the group ids present, not
on how many images each group has (the DSA in ``baselines/harness/dsa.py`` satisfies this)."""

Decode = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``decode(stored, labels) -> (images, labels)``: e.g. factorisation; identity when None."""


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
        real_chunk: the real forward runs in chunks of at most this many images, so memory
            stays bounded with many classes (CIFAR-100: 25,600 real images an iteration).
            Chunking does not change the result.
    """

    def __init__(self, real: ClassIndexedData, network_factory: Callable[[], nn.Module],
                 syn_init: torch.Tensor, *, num_iterations: int, plugins: PluginSet | None = None,
                 augment: Augment | None = None, decode: Decode | None = None,
                 batch_real: int = 256, lr: float = 1.0, momentum: float = 0.5, seed: int = 0,
                 device: str | torch.device = "cpu", channels_last: bool = False,
                 compile_real: bool = False, real_chunk: int = 2560, extra: dict | None = None):
        self.real = real
        self.num_classes = int(real.num_classes)
        if syn_init.shape[0] % self.num_classes:
            raise ValueError(f"{syn_init.shape[0]} synthetic images do not split evenly over "
                             f"{self.num_classes} classes")
        self.ipc = syn_init.shape[0] // self.num_classes
        self.num_iterations = int(num_iterations)
        self.plugins = plugins if plugins is not None else PluginSet()
        self.augment = augment
        self.decode = decode
        self.batch_real = int(batch_real)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.extra = dict(extra or {})
        self.syn = syn_init.detach().clone().to(self.device).requires_grad_(True)
        self.syn_labels = torch.arange(self.num_classes, device=self.device).repeat_interleave(self.ipc)
        self.optimizer = torch.optim.SGD([self.syn], lr=lr, momentum=momentum)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.extractor = network_factory().to(self.device).train().requires_grad_(False)
        self.extractor.to(memory_format=self.memory_format)
        self.extra.setdefault("memory_format", "channels_last" if channels_last else "contiguous")
        self._embed_real = torch.compile(self.extractor.embed) if compile_real else self.extractor.embed
        self.real_chunk = int(real_chunk)
        self.iteration = 0
        self._set_up = False

    # -- pieces of one iteration ----------------------------------------------------------
    def prepare_extractor(self, t: int) -> nn.Module:
        """Plugins may set the weights; otherwise a fresh random draw (plain DM)."""
        self._ensure_setup()
        if not self.plugins.update_extractor(self.extractor, t):
            reinitialize_(self.extractor, derive_seed(self.seed, _NET_STREAM, t))
        return self.extractor

    def real_batch(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All classes' real batches of iteration t, concatenated, and their labels."""
        g = make_generator(self.seed, _REAL_STREAM, t)
        batches = [self.real.sample(c, self.batch_real, g) for c in range(self.num_classes)]
        labels = torch.cat([torch.full((b.shape[0],), c, dtype=torch.long)
                            for c, b in enumerate(batches)])
        return torch.cat(batches).to(self.device), labels.to(self.device)

    def synthetic_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoded synthetic images (with graph to the stored ones) and their labels."""
        if self.decode is None:
            return self.syn, self.syn_labels
        return self.decode(self.syn, self.syn_labels)

    def _augment(self, x: torch.Tensor, groups: torch.Tensor, t: int) -> torch.Tensor:
        if self.augment is not None:
            x = self.augment(x, groups, make_generator(self.seed, _AUG_STREAM, t))
        return x.contiguous(memory_format=self.memory_format)

    def compute_loss(self, t: int) -> tuple[torch.Tensor, dict]:
        """Build iteration t's total loss (matching + auxiliary) and its metrics; no step."""
        net = self.prepare_extractor(t)
        real, real_labels = self.real_batch(t)
        with torch.no_grad():
            real_aug = self._augment(real, real_labels, t)
            real_features = torch.cat([self._embed_real(chunk)
                                       for chunk in real_aug.split(self.real_chunk)])
        syn, syn_labels = self.synthetic_batch()
        syn_aug = self._augment(syn, syn_labels, t)
        syn_features = net.embed(syn_aug)

        kept = real_labels
        kept_features = real_features
        if self.plugins.filters_real:
            keep = self._keep_mask(real_features, real_labels, syn_features, syn_labels, t)
            kept, kept_features = real_labels[keep], real_features[keep]
        real_mean = class_means(kept_features, kept, self.num_classes)
        syn_mean = class_means(syn_features, syn_labels, self.num_classes)
        match = ((real_mean - syn_mean) ** 2).sum()

        parts = self.plugins.auxiliary_losses(syn_aug, syn_labels, t)
        total = match + sum(parts.values()) if parts else match
        metrics = {"loss": float(total.detach()), "loss_match": float(match.detach()),
                   **{f"loss_{name}": float(v.detach()) for name, v in parts.items()},
                   "real_kept": kept.numel() / max(real_labels.numel(), 1)}
        return total, metrics

    def _keep_mask(self, real_features, real_labels, syn_features, syn_labels, t) -> torch.Tensor:
        keep = torch.ones_like(real_labels, dtype=torch.bool)
        for c in range(self.num_classes):
            rows = (real_labels == c).nonzero(as_tuple=True)[0]
            mask = self.plugins.keep_mask(c, real_features[rows], syn_features[syn_labels == c], t)
            if mask is not None:
                keep[rows] = mask.to(keep.device)
        return keep

    def step(self, t: int | None = None) -> dict:
        """Run one iteration (default: the next one) and return its metrics."""
        t = self.iteration if t is None else t
        self._ensure_setup()
        start = time.perf_counter()
        total, metrics = self.compute_loss(t)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self.iteration = t + 1
        metrics["iteration"] = t
        metrics["seconds"] = time.perf_counter() - start
        return metrics

    # -- the whole run --------------------------------------------------------------------
    def context(self) -> DistillContext:
        return DistillContext(num_classes=self.num_classes, ipc=self.ipc,
                              num_iterations=self.num_iterations, extractor=self.extractor,
                              real=self.real, device=self.device, seed=self.seed,
                              extra=self.extra)

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
        bar = tqdm(range(self.iteration, self.num_iterations), total=self.num_iterations,
                   initial=self.iteration, desc="distill", disable=not progress or tqdm is None)
        try:
            self._ensure_setup()
            for t in bar:
                metrics = self.step(t)
                bar.set_postfix(loss=f"{metrics['loss']:.3g}", s_it=f"{metrics['seconds']:.2f}")
                if callback is not None:
                    callback(t, metrics)
        finally:
            self.close()
        return self.syn.detach()

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume: next iteration, stored images, optimiser state."""
        return {"iteration": self.iteration, "syn": self.syn.detach().cpu().clone(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["syn"].shape) != tuple(self.syn.shape):
            raise ValueError(f"checkpoint holds synthetic images of shape "
                             f"{tuple(state['syn'].shape)}, this run expects {tuple(self.syn.shape)}")
        with torch.no_grad():
            self.syn.copy_(state["syn"].to(self.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration = int(state["iteration"])
