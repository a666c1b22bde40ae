"""The run description handed to :func:`dm_plugins.hookspecs.dm_setup`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .data import ClassIndexedData


@dataclass
class DistillContext:
    """What a distillation run is, as plugins see it.

    Attributes:
        num_classes: number of classes C.
        ipc: stored synthetic images per class (the budget; with factorisation each stored image
            decodes to several training images, but capacity matching's alpha compares to this).
        num_iterations: T.
        extractor: the host's feature extractor (modified in place by extractor updaters).
        real: class-indexed real data in normalised space.
        device: where the host computes.
        seed: the run seed.
        extra: free-form host information (method name, dataset name, ...).
    """

    num_classes: int
    ipc: int
    num_iterations: int
    extractor: torch.nn.Module
    real: ClassIndexedData
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
