"""IDM adapter: the dm_plugins hooks grafted onto IDM (``baselines/methods/idm.py``).

The worked example for your own IDM fork. IDM's loop names the points where a hook goes
(``matching_extractor``, ``select_real``, ``extra_losses``, ``start`` / ``close``); this wrapper
overrides each one with a call to :class:`dm_plugins.PluginSet` and changes nothing else. In a
fork whose loop is written out inline, the same four calls go at the same four places.

What each plugin replaces and what it adds on IDM:

* ``ptm`` replaces the network whose features are matched: in every matching pass its own
  network (an expert's weights interpolated by Eq. 5) computes the real and synthetic features
  instead of the queue net drawn for the pass. Everything else of IDM stays. The queue net is
  still drawn, so the random draws are those of plain IDM. IDM's class-aware CE term is still
  computed, through that drawn queue net (not the plugin's network), weighted by ``ce_weight``
  times the queue net's running training accuracy in percent. The queue is still pushed,
  evicted and trained as without the plugin. The plugin never modifies a queue model: the
  queue's weights, optimiser states and meters stay bit-identical to a run without it.
* ``plm`` adds its loss (Eq. 9) to every class's loss next to IDM's CE term, which stays:
  ``match + ce_weight * acc * CE + L_plm`` per class, still one image step per class. It sees
  the synthetic images exactly as the matching step does (decoded, augmented with that class's
  draw). It is called once per class, and the per-class calls add up to one batched call.
* ``cap`` filters each matching step's real batch: per class (and per matching pass), only the
  real features it keeps enter the real mean. It does not touch the CE term or the queue's
  training batches.

Each plugin runs its hook per iteration: ``ptm`` once per matching pass, ``cap`` and ``plm``
once per class per pass (one pass per iteration by default). With no plugin the host is IDM,
bit-identical. ``tests/test_idm.py`` tests each statement above.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn

from baselines.harness.datasets import Dataset
from baselines.harness.dsa import DSA
from baselines.harness.factorization import decode
from baselines.methods.idm import IDM
from dm_plugins import DistillContext, PluginSet
from dm_plugins.distributed import ClassShard, place_real
from dm_plugins.experts import build_network


#: What this host gives plugins (:attr:`dm_plugins.DistillContext.offers`): the pass's matching
#: network, passed to ``dm_auxiliary_loss`` (``plm --plm-logits extractor``). Its real features
#: are computed for every class before the class loop, so it offers no real batch there.
OFFERS = frozenset({"extractor"})


class IDMHost(IDM):
    """IDM with dm_plugins hooks: :class:`IDM`'s arguments plus ``plugins`` (None = plain IDM)."""

    def __init__(self, *args, plugins: PluginSet | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.plugins = plugins if plugins is not None else PluginSet()

    def start(self) -> None:
        if not self._started:
            self.plugins.setup(DistillContext(
                num_classes=self.num_classes, ipc=self.ipc, num_iterations=self.num_iterations,
                real=self.real, device=self.device, memory_format=self.memory_format,
                seed=self.seed, extra=self.extra,
                classes=None if self.shard is None else list(self.classes), offers=OFFERS,
                extractor=build_network(self.network_factory)))  # a template, never used
        super().start()

    def matching_extractor(self, t, queue_net):
        return self.plugins.extractor(t, fallback=queue_net)                        # ptm

    def select_real(self, label, real_features, syn_features, t):
        return self.plugins.select_real(label, real_features, syn_features, t)      # cap

    def feature_losses(self, label, real_features, syn_features, t):
        return self.plugins.feature_losses(label, real_features, syn_features, t)   # iid-cm

    def extra_losses(self, syn_images, syn_labels, t, extractor=None):
        return self.plugins.auxiliary_losses(syn_images, syn_labels, t,             # plm
                                             extractor=extractor)

    def close(self) -> None:
        if self._started:
            self.plugins.teardown()
        super().close()


def build_idm_host(dataset: Dataset, network_factory: Callable[[], nn.Module],
                   syn_init: torch.Tensor, *, plugins: PluginSet | None = None, factor: int = 2,
                   dsa: bool = True, device: torch.device = torch.device("cpu"),
                   shard: ClassShard | None = None, **settings) -> IDMHost:
    """An :class:`IDMHost` over ``dataset.train`` (moved to ``device`` once): DSA as the Siamese
    augmentation (no flip on digit-like data), the ``factor x factor`` partition as the decoder
    (factor 2 is IDM's 2x2 partition; 1 turns it off). ``settings`` are :class:`IDM`'s keyword
    arguments (``num_iterations``, ``batch_real``, ``lr``, ``ce_weight``, ...). ``shard``:
    optimise only the shard's classes (``syn_init`` holds only theirs; ``dataset.train`` must
    hold every class, for the model queue; see :class:`IDM`)."""
    real = place_real(dataset.train, device)
    augment = DSA(flip=not dataset.is_digit_like).siamese if dsa else None
    extra = {"method": "idm", "dataset": dataset.name, "factor": factor}
    return IDMHost(real, network_factory, syn_init, plugins=plugins, augment=augment,
                   decode=partial(decode, factor=factor) if factor > 1 else None,
                   device=device, extra=extra, shard=shard, **settings)
