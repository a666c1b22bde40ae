"""Chunked forwards: bounded memory for the real and synthetic paths of every host.

A forward through a network whose output for one image does not depend on the rest of its batch
(:func:`batch_independent`) can be split into chunks without changing the result:

- the real forward (no graph): :func:`chunked_features`, or :func:`chunked_class_sums` /
  :func:`chunked_class_means`, which fold each chunk's features into the class sums at once;
  a host also draws and augments its real images in blocks of whole classes
  (:data:`DEFAULT_REAL_BLOCK`), so nothing of an iteration grows with the number of classes;
- the synthetic forward (with graph): :func:`checkpointed_forward` keeps only the chunks' inputs
  and recomputes one chunk's activations at a time in the backward pass (activation
  checkpointing), so the graph of all synthetic images is never held at once. It costs one extra
  forward of the synthetic images.

Networks with BatchNorm in training mode couple a batch's images: :func:`chunk_for` then answers
"everything at once", so chunking never changes what is computed.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

DEFAULT_REAL_CHUNK = {"cpu": 32, "cuda": 1024}
"""Real-forward chunk per device type. On CPU (ConvNet-3, CIFAR-sized images, 2,560 real images
an iteration, 2 threads) chunks of 32 ran the real forward in 1.45 s against 2.33 s for one
batch (``benchmarks/iteration_cost.py`` stage breakdown, ``host`` vs ``host-unchunked``): the
activations of a chunk stay in cache. An earlier sweep on another 2-core CPU
(``--chunk-sweep``) found chunks of 8 to 32 equally fast and 64 slower. The CUDA value was not
measured (no GPU here); large chunks keep a GPU busy while bounding memory."""
_WHOLE_BATCH = 1 << 62


def default_real_chunk(device: str | torch.device) -> int:
    """The real-forward chunk a host uses on ``device`` unless told otherwise."""
    return DEFAULT_REAL_CHUNK.get(torch.device(device).type, DEFAULT_REAL_CHUNK["cuda"])


def batch_independent(net: nn.Module) -> bool:
    """True when ``net``'s output for an image does not depend on the other images of its batch
    (no BatchNorm in training mode), so a forward may be split into chunks."""
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
                   for m in net.modules())


def chunk_for(net: nn.Module, chunk: int) -> int:
    """``chunk``, or "everything at once" when ``net``'s forward couples the images of a batch
    (see :func:`batch_independent`): the chunk a real forward through ``net`` may use."""
    return chunk if batch_independent(net) else _WHOLE_BATCH


def chunked_features(embed: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                     chunk: int) -> torch.Tensor:
    """``embed(images)`` computed ``chunk`` images at a time (no graph is assumed)."""
    return torch.cat([embed(part) for part in images.split(chunk)])


def chunked_class_sums(embed: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                       labels: torch.Tensor, num_classes: int, chunk: int,
                       sums: torch.Tensor | None = None) -> torch.Tensor:
    """Add each image's ``embed`` features into ``sums[label]`` and return ``sums`` (a new
    (num_classes, D) zero tensor when None). The forward runs ``chunk`` images at a time and each
    chunk's features are folded in at once, so the features of all images are never held
    together; a caller streaming blocks of images passes the same ``sums`` to every call."""
    for part, part_labels in zip(images.split(chunk), labels.split(chunk)):
        features = embed(part)
        if sums is None:
            sums = features.new_zeros(num_classes, features.shape[1])
        sums.index_add_(0, part_labels, features)
    return sums


def chunked_class_means(embed: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                        labels: torch.Tensor, num_classes: int, chunk: int) -> torch.Tensor:
    """``class_means(embed(images), labels, num_classes)`` through :func:`chunked_class_sums`."""
    sums = chunked_class_sums(embed, images, labels, num_classes, chunk)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1)
    return sums / counts.unsqueeze(1).to(sums)


DEFAULT_REAL_BLOCK = {"cpu": 4096, "cuda": 16384}
"""At most this many real images (whole classes, at least one) are drawn, augmented and
forwarded at a time per device type (:class:`dm_plugins.loop.DMHost`), so an iteration's memory
does not grow with the number of classes: CIFAR-10 at 256 images per class (2,560) is one block,
CIFAR-100 (25,600) is seven. Blocks change no number (the augmentation draws are made for every
class and picked by class). Neither value is tuned for speed: a block of 4,096 CIFAR-sized
images holds about 100 MB (the images and their augmented copy)."""


def default_real_block(device: str | torch.device) -> int:
    """The real-block size (images) a host uses on ``device`` unless told otherwise."""
    return DEFAULT_REAL_BLOCK.get(torch.device(device).type, DEFAULT_REAL_BLOCK["cuda"])


DEFAULT_SYN_CHUNK = {"cpu": 128, "cuda": 1 << 62}
"""Synthetic-forward chunk per device type. On CPU (``benchmarks/iteration_cost.py
--syn-chunk``, ConvNet-3, CIFAR-sized images, 256 real images per class) chunks of 128 kept
every DM host variant's peak memory at or near the per-class naive loop's at IPC 10 and 50 (at
IPC 50 the plain host used 2,460 MiB against the naive loop's 2,073; chunked, 1,629), and made
the PTLM preset at IPC 50 (2,000 decoded images) faster (12.9 s against 18.1 s, memory 1.8 GB
against 8.3 GB), at the price of one extra synthetic forward: +21 % for the PTLM preset at IPC 10.
Sets of at most 128 images (IPC 10 at factor 1) are not chunked. Off on CUDA (not measured
here)."""


def default_syn_chunk(device: str | torch.device) -> int:
    """The synthetic-forward chunk a host uses on ``device`` unless told otherwise."""
    return DEFAULT_SYN_CHUNK.get(torch.device(device).type, DEFAULT_SYN_CHUNK["cuda"])


def checkpointed_forward(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                         chunk: int) -> torch.Tensor:
    """``fn(images)`` with a graph, computed ``chunk`` images at a time under activation
    checkpointing: the backward pass recomputes one chunk's activations at a time. With
    ``chunk >= len(images)`` it is exactly ``fn(images)`` (no recomputation)."""
    if chunk >= images.shape[0]:
        return fn(images)
    return torch.cat([checkpoint(fn, part, use_reentrant=False) for part in images.split(chunk)])
