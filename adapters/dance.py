"""DANCE adapter: the dm_plugins hooks grafted onto DANCE (``baselines/methods/dance.py``).

The worked example for your own DANCE fork. DANCE's loop names the points where a hook goes
(``matching_extractor``, ``select_real``, ``inter_class_losses``, ``start`` / ``close``); this
wrapper overrides each one with a call to :class:`dm_plugins.PluginSet` and changes nothing
else. In a fork whose loop is written out inline, the same calls go at the same places.

What each plugin replaces and what it adds on DANCE:

* ``ptm`` replaces the middle model of the inner-class step: its own network, expert
  ``pick(t)`` at the scheduled ratio ``r = (t / lambda) / T`` (Eq. 5), computes the real and
  synthetic features instead of DANCE's random mixture ``l * theta_init + (1 - l) * theta_star``
  with ``l ~ U(0, 1)``. The middle model is then never computed. Both use the same expert
  (``ExpertPool.pick``), and the experts' weights stay bit-identical.
* ``plm`` replaces the inter-class step's loss: per class, still one image step on the class's
  decoded synthetic images with their own augmentation draw, but the loss is PLM's (Eq. 9,
  cross-entropy through the trained expert against the sharpened class-average prediction)
  instead of DANCE's hard-label cross-entropy. Any plugin that adds losses replaces that CE the
  same way (the losses are summed); with none, DANCE's CE stays. The public code's reading
  (``--preset ptlm-code``) uses what this host offers: the inner-class network for the logits
  (``--plm-logits extractor``), a real batch of the class drawn and augmented with the
  synthetic images for the target (``--plm-target batch``), and an optimiser of the step's own
  (``--plm-step separate --plm-lr 0.01``).
* ``cap`` filters the inner-class real batch: per class, only the real features it keeps enter
  the real mean. It does not touch the inter-class step.

Per iteration: ``ptm`` runs once, ``cap`` once per class, ``plm`` once per class per
inter-class pass. With no plugin the host is DANCE, bit-identical. ``tests/test_dance.py`` tests
each statement above.
"""
from __future__ import annotations

from functools import partial

import torch

from baselines.harness.datasets import Dataset
from baselines.harness.dsa import DSA
from baselines.harness.factorization import decode
from baselines.methods.dance import DANCE
from dm_plugins import DistillContext, ExpertPool, PluginSet
from dm_plugins.distributed import ClassShard, place_real

#: The augmentation DANCE matches with (IDC's ``DiffAug`` strategy; all three ops each call).
MATCHING_STRATEGY = "color_crop_cutout"

#: What this host gives plugins (:attr:`dm_plugins.DistillContext.offers`): its inner-class
#: network and the class's real batch in the inter-class step, and that step with an optimiser
#: of its own when a plugin asks (``plm --plm-step separate``).
OFFERS = frozenset({"extractor", "real_batch", "separate_step"})


class DANCEHost(DANCE):
    """DANCE with dm_plugins hooks: :class:`DANCE`'s arguments plus ``plugins``
    (None = plain DANCE). Like DANCE it stores pixels in [0, 1]: :meth:`run` returns them
    unnormalised (``baselines/dance.py`` declares ``stores_pixels`` on its spec)."""

    def __init__(self, *args, plugins: PluginSet | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.plugins = plugins if plugins is not None else PluginSet()

    def start(self) -> None:
        if not self._started:
            self.plugins.setup(DistillContext(
                num_classes=self.num_classes, ipc=self.ipc, num_iterations=self.num_iterations,
                real=self.real, device=self.device, memory_format=self.memory_format,
                seed=self.seed, extra=self.extra,
                classes=None if self.shard is None else list(self.classes),
                offers=OFFERS, extractor=self.experts.network()))  # a template, never used
        super().start()

    def matching_extractor(self, t, middle):
        return self.plugins.extractor(t, fallback=middle)                           # ptm

    def select_real(self, label, real_features, syn_features, t):
        return self.plugins.select_real(label, real_features, syn_features, t)      # cap

    def feature_losses(self, label, real_features, syn_features, t):
        return self.plugins.feature_losses(label, real_features, syn_features, t)   # iid-cm

    def inter_class_losses(self, syn_images, syn_labels, t, extractor=None, real_images=None,
                           real_labels=None):
        if self.plugins.adds_losses:                                                # plm
            return self.plugins.auxiliary_losses(syn_images, syn_labels, t, extractor=extractor,
                                                 real_images=real_images,
                                                 real_labels=real_labels)
        return super().inter_class_losses(syn_images, syn_labels, t)

    def inter_class_wants_real(self):                                              # plm batch
        return self.plugins.adds_losses and self.plugins.needs("real_batch")

    def inter_class_lr(self):                                                      # plm separate
        return self.plugins.separate_step_lr if self.plugins.adds_losses else None

    def close(self) -> None:
        if self._started:
            self.plugins.teardown()
        super().close()


def build_dance_host(dataset: Dataset, experts: ExpertPool, syn_init: torch.Tensor, *,
                     plugins: PluginSet | None = None, factor: int = 2, augment: bool = True,
                     device: torch.device = torch.device("cpu"), shard: ClassShard | None = None,
                     **settings) -> DANCEHost:
    """A :class:`DANCEHost` over ``dataset.train`` (moved to ``device`` once). ``syn_init`` is
    normalised, as the harness makes it; it is stored in pixel space, clamped to [0, 1].
    Matching augmentation: IDC's ``color_crop_cutout`` (no flip in it). ``factor`` is the
    multi-formation factor (2 in DANCE; 1 turns it off). ``settings`` are :class:`DANCE`'s
    keyword arguments (``num_iterations``, ``batch_real``, ``lr``, ...). ``shard``: optimise
    only the shard's classes (``syn_init`` holds only theirs; ``dataset.train`` may hold only
    their images, else it is restricted here; see :class:`DANCE`)."""
    real = place_real(dataset.train, device, None if shard is None else shard.classes)
    pixels = dataset.denormalize(syn_init).clamp(0.0, 1.0)
    extra = {"method": "dance", "dataset": dataset.name, "factor": factor}
    return DANCEHost(real, experts, pixels, plugins=plugins, normalize=dataset.normalize,
                     augment=DSA(MATCHING_STRATEGY).sequence if augment else None,
                     decode=partial(decode, factor=factor) if factor > 1 else None,
                     device=device, extra=extra, shard=shard, **settings)
