"""Class-indexed real data: the only view of a dataset the DM host and the plugins need.

Any object with ``num_classes``, ``images_of(c)`` and ``sample(c, n, generator)`` works as the
host's real data (a structural protocol); :class:`ClassIndexedTensors` is the in-memory
implementation used by the harness and the tests.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ClassIndexedData(Protocol):
    """What a DM host reads from a real dataset."""

    num_classes: int

    def images_of(self, label: int) -> torch.Tensor:
        """All (normalised) images of class ``label``, shape (n_c, C, H, W)."""

    def sample(self, label: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """``min(n, n_c)`` distinct random images of class ``label``, drawn with ``generator``."""


class ClassIndexedTensors:
    """Images and labels held in memory, indexed by class.

    Args:
        images: float tensor (N, C, H, W), already normalised.
        labels: integer tensor (N,) with values in ``[0, num_classes)``.
        num_classes: defaults to ``labels.max() + 1``.

    Sampling is without replacement inside a class and driven only by the generator passed in,
    so the same generator state always gives the same batch (no global RNG use).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None):
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"labels must be (N,) matching {images.shape[0]} images, got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()
        self.num_classes = int(num_classes if num_classes is not None else int(self.labels.max()) + 1)
        self._indices = [torch.nonzero(self.labels == c, as_tuple=True)[0]
                         for c in range(self.num_classes)]

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def to(self, device: str | torch.device) -> "ClassIndexedTensors":
        """The same data with images and labels on ``device``."""
        return ClassIndexedTensors(self.images.to(device), self.labels.to(device),
                                   self.num_classes)

    def class_size(self, label: int) -> int:
        return int(self._indices[label].numel())

    def class_sizes(self) -> list[int]:
        return [self.class_size(c) for c in range(self.num_classes)]

    def images_of(self, label: int) -> torch.Tensor:
        return self.images[self._indices[label]]

    def sample(self, label: int, n: int, generator: torch.Generator) -> torch.Tensor:
        idx = self._indices[label]
        if idx.numel() == 0:
            raise ValueError(f"class {label} has no images")
        perm = torch.randperm(idx.numel(), generator=generator)[:n]
        return self.images[idx[perm]]
