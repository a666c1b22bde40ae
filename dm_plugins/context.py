"""The run description handed to :func:`dm_plugins.hookspecs.dm_setup`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .data import ClassIndexedData
from .errors import PluginError


OFFERS = frozenset({"extractor", "real_batch", "separate_step"})
"""What a host may offer plugins (:attr:`DistillContext.offers`)."""


@dataclass
class DistillContext:
    """What a distillation run is, as plugins see it.

    Only the first three fields are required; a plugin that needs an optional one the loop did
    not give raises :class:`dm_plugins.PluginError` at setup (see :meth:`require`).

    Attributes:
        num_classes: number of classes C.
        ipc: stored synthetic images per class (the budget; with factorisation each stored image
            decodes to several training images, but capacity matching's alpha compares to this).
        num_iterations: T; iterations are numbered ``0 .. T-1``.
        real: class-indexed real data in normalised space (needed by ``plm``).
        extractor: the loop's own network, used only to check that plugin-provided networks
            have the same architecture; never modified.
        device: where the loop computes (plugins build their networks here).
        memory_format: the loop's memory format for images and networks.
        seed: the run seed (plugins derive their random draws from it).
        extra: free-form host information (method name, dataset name, ...).
        classes: the classes this host optimises when it holds only some (a class-sharded run,
            :mod:`dm_plugins.distributed`): the synthetic images a plugin sees are theirs, and
            ``real`` may hold only their images (it still draws for every class). None: all.
        offers: what the host gives plugins beyond the required hook arguments:
            ``"extractor"`` (its matching network of iteration t passed to
            ``dm_auxiliary_loss``), ``"real_batch"`` (the class's real batch, augmented with the
            synthetic images' draw, passed there too) and ``"separate_step"`` (it runs the
            auxiliary losses in an image step of their own when a plugin asks for one, see
            :attr:`dm_plugins.PluginSet.separate_step_lr`). A plugin whose options need one
            the host does not offer refuses at setup. DANCE's host offers all three, DM's and
            IDM's ``"extractor"``; a user's loop offers what it passes (default: nothing).
    """

    num_classes: int
    ipc: int
    num_iterations: int
    real: ClassIndexedData | None = None
    extractor: nn.Module | None = None
    device: torch.device | str = "cpu"
    memory_format: torch.memory_format = torch.contiguous_format
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    classes: list[int] | None = None
    offers: frozenset[str] = frozenset()

    def __post_init__(self):
        for name in ("num_classes", "ipc", "num_iterations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PluginError(f"DistillContext.{name} must be an integer >= 1, got {value!r}")
        self.device = torch.device(self.device)
        unknown = set(self.offers) - OFFERS
        if unknown:
            raise PluginError(f"DistillContext.offers: unknown {', '.join(sorted(unknown))}; "
                              f"known: {', '.join(sorted(OFFERS))}")
        self.offers = frozenset(self.offers)

    def require(self, name: str, plugin: str, why: str):
        """The optional field ``name``, or a one-line :class:`PluginError` if it is missing."""
        value = getattr(self, name)
        if value is None:
            raise PluginError(f"plugin {plugin!r} needs DistillContext.{name} ({why}); pass "
                              f"{name}=... to PluginSet.setup")
        return value
