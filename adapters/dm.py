"""DM adapter: the DM baseline runs on dm_plugins' own host.

DM's loop *is* the minimal loop in :mod:`dm_plugins.loop` (plain DM when no plugin is
registered), so this adapter only wires the harness pieces into :class:`dm_plugins.DMHost`:
the class-indexed real data, the network factory, the DSA as Siamese augmentation (one draw per
class for a class's real and synthetic images) and, with factorisation, the decoder. The hooks
then sit where DM needs them: ``ptm`` supplies the extractor instead of a fresh random network,
``cap`` filters each class's real features, ``plm``'s loss is added to the matching loss (Eq. 10).
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn

from baselines.harness.datasets import Dataset
from baselines.harness.dsa import DSA
from baselines.harness.factorization import decode
from dm_plugins import DMHost, PluginSet
from dm_plugins.distributed import ClassShard, place_real


def build_dm_host(dataset: Dataset, network_factory: Callable[[], nn.Module],
                  syn_init: torch.Tensor, *, plugins: PluginSet, iterations: int,
                  batch_real: int, lr: float, momentum: float, factor: int, seed: int,
                  device: torch.device, dsa: bool = True, channels_last: bool = False,
                  compile_real: bool = False, compile_syn: bool = False,
                  real_chunk: int | None = None,
                  real_block: int | None = None, syn_chunk: int | None = None, stage_timer=None,
                  shard: ClassShard | None = None) -> DMHost:
    """A :class:`DMHost` over ``dataset.train`` (moved to ``device`` once, up front).

    ``syn_init`` are the stored images (normalised, sorted by class), factorised when
    ``factor > 1``. ``compile_real``, ``compile_syn``, ``real_chunk``, ``real_block``, ``syn_chunk`` and ``stage_timer`` go to
    :class:`DMHost` (None: the device's defaults; no timing). ``shard``: optimise only the shard's
    classes (``syn_init`` holds only theirs; ``dataset.train`` may hold only their images, a
    :class:`dm_plugins.distributed.ShardedClassData`, else it is restricted here).
    """
    real = place_real(dataset.train, device, None if shard is None else shard.classes)
    augment = DSA(flip=not dataset.is_digit_like).siamese if dsa else None
    return DMHost(real, network_factory, syn_init, num_iterations=iterations, plugins=plugins,
                  augment=augment, decode=partial(decode, factor=factor) if factor > 1 else None,
                  batch_real=batch_real, lr=lr, momentum=momentum, seed=seed, device=device,
                  channels_last=channels_last, compile_real=compile_real,
                  compile_syn=compile_syn,
                  real_chunk=real_chunk, real_block=real_block, syn_chunk=syn_chunk,
                  stage_timer=stage_timer,
                  extra={"method": "dm", "dataset": dataset.name, "factor": factor},
                  shard=shard)
