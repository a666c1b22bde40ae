"""Naive per-class DM, written the way the original DM code does it (Zhao & Bilen, 2023).

Kept as the yardstick for the fast host: tests check that :class:`dm_plugins.loop.DMHost`
computes the same loss and gradient, and ``benchmarks/iteration_cost.py`` times it as the
baseline iteration. Not used by any host.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn


def naive_dm_loss(network: nn.Module, real_batches: Sequence[torch.Tensor],
                  syn_batches: Sequence[torch.Tensor],
                  augment: Callable[[torch.Tensor, int], torch.Tensor] | None = None
                  ) -> torch.Tensor:
    """``sum_c || mean f(real_c) - mean f(syn_c) ||^2``, one class at a time.

    Args:
        network: the extractor (``embed`` gives the matched features).
        real_batches, syn_batches: per-class real and synthetic images.
        augment: ``augment(images, c)``; it must apply the same transform to class c's real
            and synthetic images (call it with a generator re-seeded per class).
    """
    loss = 0.0
    for c, (real, syn) in enumerate(zip(real_batches, syn_batches)):
        if augment is not None:
            real, syn = augment(real, c), augment(syn, c)
        out_real = network.embed(real).detach()
        out_syn = network.embed(syn)
        loss = loss + torch.sum((out_real.mean(dim=0) - out_syn.mean(dim=0)) ** 2)
    return loss
