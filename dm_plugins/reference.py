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


def naive_dm_iteration(real, network_factory: Callable[[], nn.Module], syn: torch.Tensor,
                       optimizer: torch.optim.Optimizer, *, ipc: int, batch_real: int,
                       augment: Callable | None, seed: int, iteration: int,
                       device: str | torch.device = "cpu") -> float:
    """One iteration of the original DM code: a new random network, then for each class a fresh
    augmentation draw applied to the class's real batch and synthetic images in two calls, a
    forward of the real batch, a forward of the synthetic images; one backward and one step.

    Args:
        real: class-indexed real data.
        syn: stored synthetic images (leaf tensor optimised by ``optimizer``), sorted by class.
        augment: Siamese ``augment(x, groups, generator)`` called with ``groups=None``.
    Returns:
        The loss value.
    """
    from .seeding import derive_seed, make_generator

    net = network_factory().to(device)
    net.train()
    for p in net.parameters():
        p.requires_grad = False
    g = make_generator(seed, 0x5E, iteration)
    real_batches = [real.sample(c, batch_real, g).to(device) for c in range(real.num_classes)]
    syn_batches = [syn[c * ipc:(c + 1) * ipc] for c in range(real.num_classes)]
    def per_class(x, c):
        return augment(x, None, make_generator(derive_seed(seed, iteration, c)))
    loss = naive_dm_loss(net, real_batches, syn_batches, per_class if augment else None)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())
