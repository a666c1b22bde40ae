"""Class-sharded distillation across processes (``torchrun``): which classes a process owns, a
real-data view holding only those, and the few collectives a sharded run needs.

The contract a class-sharded host keeps (:class:`dm_plugins.DMHost` with ``shard=``):

* Rank r of K owns the contiguous classes :func:`class_range` ``(C, r, K)`` (the first
  ``C % K`` ranks one class more), and holds only their synthetic images and optimiser state.
  Rank order is class order, so concatenating the ranks' images gives the single-process set.
* Every random draw of iteration t comes from the same (seed, t) generators as in a single
  process. Draws made class by class from one generator (the real batches) are replayed for
  the classes a rank does not own: :class:`ShardedClassData` knows every class's size and
  consumes the generator exactly as the full data would, returning no images for those classes.
* The losses are sums of per-class terms, so each rank's gradient on its own images equals the
  single-process one; no gradient is exchanged. Only the logged loss values are summed over
  ranks (:meth:`ClassShard.sum`).

So K processes produce the single-process synthetic set up to float rounding (the real forward
runs over fewer images per call; the per-image numbers are those of the single process),
provided the network treats the images of a batch independently (no BatchNorm in training mode;
a sharded :class:`dm_plugins.DMHost` refuses one that does not).

Process groups: :func:`init_process_group` reads torchrun's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and picks the backend from the
device: NCCL for CUDA (each rank on ``cuda:LOCAL_RANK``), gloo for CPU. Without ``WORLD_SIZE >
1`` nothing is initialised and every collective here is the identity, so single-process code
paths need no branches.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import torch

TIMEOUT = timedelta(minutes=60)
"""How long a collective waits for the slowest rank (e.g. a rank training one more expert than
the others, or rank 0 loading the data); longer than torch's default so an expert fits in it."""


def class_range(num_classes: int, rank: int, world_size: int) -> range:
    """The contiguous classes rank ``rank`` of ``world_size`` owns: ``num_classes`` split into
    ``world_size`` runs of consecutive ids, the first ``num_classes % world_size`` one longer.
    Raises ValueError when a rank would own no class (``world_size > num_classes``)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    if world_size > num_classes:
        raise ValueError(f"{world_size} processes for {num_classes} classes: every process needs "
                         f"at least one class; use at most {num_classes} processes")
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


@dataclass(frozen=True)
class ClassShard:
    """The classes one process of a class-sharded run owns (see the module docstring).

    ``ClassShard(C, r, K)`` without a process group is a valid shard too (tests run the ranks
    one after another in one process); :meth:`sum` then returns the rank's own values.
    """

    num_classes: int
    rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        class_range(self.num_classes, self.rank, self.world_size)  # validates

    @property
    def classes(self) -> range:
        return class_range(self.num_classes, self.rank, self.world_size)

    def sum(self, values: Sequence[float]) -> list[float]:
        """``values`` summed element-wise over the ranks (float64), when a process group of
        ``world_size`` processes is running; the values themselves otherwise."""
        if not active(self.world_size):
            return [float(v) for v in values]
        buf = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_device())
        torch.distributed.all_reduce(buf)
        return buf.cpu().tolist()


class ShardedClassData:
    """Class-indexed real data holding the images of some classes and the sizes of all.

    ``sample(c, n, g)`` draws ``torch.randperm(n_c, generator=g)[:n]`` for every class, as
    :class:`dm_plugins.ClassIndexedTensors` does, so a generator shared by all classes advances
    identically; for a class not held it returns an empty (0, C, H, W) batch. ``images_of`` of a
    class not held raises. What is loaded: the images and labels of the held classes only
    (``images`` / ``labels``, in the full data's order), plus one size per class.

    Args:
        images, labels: the held classes' images (normalised) and their global labels.
        class_sizes: the size of every class of the full data (length ``num_classes``).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_sizes: Sequence[int]):
        from .data import ClassIndexedTensors
        self.num_classes = len(class_sizes)
        self._sizes = [int(n) for n in class_sizes]
        self._held = ClassIndexedTensors(images, labels, self.num_classes)
        self.held_classes = [c for c in range(self.num_classes) if self._held.class_size(c)]
        self._held_set = frozenset(self.held_classes)
        for c in self.held_classes:
            if self._held.class_size(c) != self._sizes[c]:
                raise ValueError(f"class {c}: {self._held.class_size(c)} images given, but its "
                                 f"size is {self._sizes[c]}")

    @classmethod
    def restrict(cls, data, classes: Sequence[int]) -> "ShardedClassData":
        """The view of ``data`` (a :class:`dm_plugins.ClassIndexedTensors`) holding ``classes``:
        their images are copied out, so the full tensor can be freed."""
        keep = torch.isin(data.labels, torch.as_tensor(list(classes), device=data.labels.device))
        return cls(data.images[keep], data.labels[keep], data.class_sizes())

    images = property(lambda self: self._held.images)
    labels = property(lambda self: self._held.labels)
    image_shape = property(lambda self: self._held.image_shape)

    def __len__(self) -> int:
        return len(self._held)

    def to(self, device: str | torch.device) -> "ShardedClassData":
        return ShardedClassData(self.images.to(device), self.labels.to(device), self._sizes)

    def class_size(self, label: int) -> int:
        return self._sizes[label]

    def class_sizes(self) -> list[int]:
        return list(self._sizes)

    def images_of(self, label: int) -> torch.Tensor:
        if label not in self._held_set:
            raise ValueError(f"class {label} is not held by this process (it holds classes "
                             f"{self.held_classes})")
        return self._held.images_of(label)

    def sample(self, label: int, n: int, generator: torch.Generator) -> torch.Tensor:
        if label not in self._held_set:
            return skip_sample(self, label, n, generator)
        return self._held.sample(label, n, generator)


def skip_sample(real, label: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """What a process draws for a class it does not hold: ``generator`` advanced exactly as
    ``real.sample(label, n, generator)`` would advance it (``randperm`` of the class's size, the
    draw of :class:`dm_plugins.ClassIndexedTensors` and :class:`ShardedClassData`), and an empty
    (0, C, H, W) batch; no image is copied. Data without ``class_size`` is sampled and dropped."""
    shape = tuple(real.image_shape) if hasattr(real, "image_shape") else None
    if shape is None or not hasattr(real, "class_size"):
        return real.sample(label, n, generator)[:0]
    if real.class_size(label) == 0:
        raise ValueError(f"class {label} has no images")
    torch.randperm(real.class_size(label), generator=generator)
    return real.images.new_empty((0, *shape))


def place_real(real, device: str | torch.device, classes: Sequence[int] | None = None):
    """The real data a host computes on: ``real`` (a :class:`dm_plugins.ClassIndexedTensors`
    or :class:`ShardedClassData`) restricted to ``classes`` when given (unless it already is a
    :class:`ShardedClassData`), and moved to ``device`` once when that is not the CPU."""
    if classes is not None and not isinstance(real, ShardedClassData):
        real = ShardedClassData.restrict(real, classes)
    return real if torch.device(device).type == "cpu" else real.to(device)


# -- the process group --------------------------------------------------------------------------
@dataclass(frozen=True)
class World:
    """This process's place in a torchrun launch (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> World:
    """``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` as torchrun sets them (defaults 0, 1, 0).
    Raises ValueError on values that are not integers or not consistent."""
    try:
        world = World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                      int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets "
                         "them)") from None
    if world.world_size < 1 or not 0 <= world.rank < world.world_size:
        raise ValueError(f"RANK {world.rank} / WORLD_SIZE {world.world_size} are inconsistent")
    return world


def init_process_group(world: World, device: torch.device) -> torch.device:
    """Join torchrun's process group when ``world.distributed`` (env:// rendezvous, NCCL on
    CUDA, gloo on CPU) and return the device this rank computes on: ``cuda:LOCAL_RANK`` for
    CUDA, ``device`` otherwise. A no-op for a single process."""
    if device.type == "cuda" and world.distributed:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if world.distributed and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo", rank=world.rank,
            world_size=world.world_size, timeout=TIMEOUT,
            **({"device_id": device} if device.type == "cuda" else {}))
    return device


def destroy_process_group() -> None:
    """Leave the process group, if one is running (idempotent). After a finished run every rank
    calls it after :func:`barrier`, i.e. at about the same time, as torch asks."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def active(world_size: int | None = None) -> bool:
    """True when a process group is running (of ``world_size`` processes, when given)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    return world_size is None or torch.distributed.get_world_size() == world_size


def _device() -> torch.device:
    """Where collective buffers live: the current CUDA device under NCCL, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if not active():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank; ``obj`` itself without a process group."""
    if not active():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait until every rank gets here; nothing without a process group. Called by every rank
    at the end of a finished run, so that no rank leaves the process group while another still
    works (see :func:`destroy_process_group`)."""
    if active():
        torch.distributed.barrier()


def any_rank(*flags: bool) -> list[bool]:
    """Element-wise OR of ``flags`` over the ranks (one collective for all of them)."""
    if not active():
        return [bool(f) for f in flags]
    buf = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32, device=_device())
    torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in buf.cpu().tolist()]


def all_gather_rows(local: torch.Tensor) -> torch.Tensor:
    """The ranks' ``local`` tensors concatenated along dim 0 in rank order (they may differ in
    length; trailing shapes must agree), on ``local``'s device. With contiguous class ranges
    (:func:`class_range`) rank order is class order. ``local`` itself without a process group."""
    if not active():
        return local
    sizes = [int(n) for n in all_gather_object(int(local.shape[0]))]
    dev = _device()
    padded = local.new_zeros((max(sizes), *local.shape[1:]), device=dev)
    padded[:local.shape[0]] = local.to(dev)
    parts = [torch.empty_like(padded) for _ in sizes]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(local.device)


# -- failing together ---------------------------------------------------------------------------
class PeerFailed(Exception):
    """Another rank hit an error and reports it itself; this rank stops too (quietly)."""


def main_first(world: World, fn, errors: tuple[type[BaseException], ...] = (Exception,)):
    """``fn()`` on rank 0 first, then on the other ranks once it succeeded (for steps that
    download, train or cache something the others then reuse). An error of a type in ``errors``
    on rank 0 is raised there and :class:`PeerFailed` on the others. Just ``fn()`` without a
    process group."""
    if not active():
        return fn()
    if world.is_main:
        try:
            result = fn()
        except errors:
            broadcast_object(True)
            raise
        broadcast_object(False)
        return result
    if broadcast_object(None):
        raise PeerFailed("rank 0 failed")
    return fn()


def together(fn, errors: tuple[type[BaseException], ...] = (Exception,)):
    """``fn()`` on every rank; if it raised an error of a type in ``errors`` on any rank, that
    rank raises it and the others :class:`PeerFailed`, so no rank waits for a failed one in a
    later collective. Just ``fn()`` without a process group."""
    if not active():
        return fn()
    error = None
    try:
        result = fn()
    except errors as exc:
        error = exc
    failed = any_rank(error is not None)[0]
    if error is not None:
        raise error
    if failed:
        raise PeerFailed("another rank failed")
    return result
