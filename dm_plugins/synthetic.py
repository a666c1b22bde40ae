"""The synthetic set every host optimises: its state and checkpoint part, the image step, the run
loop, argument checks and class-shard helpers. DMHost (:mod:`dm_plugins.loop`), IDM and DANCE
(``baselines/methods/``) all build on this one module, so the pieces they share behave the same
in every host.

The contract. A host using these pieces has:

* ``syn``: the stored synthetic images, a leaf tensor with ``requires_grad``, sorted by class
  (only the shard's classes for a class-sharded host), on ``device``;
* ``optimizer``: the image optimiser over ``syn`` (one for every stored image);
* ``iteration`` (the next iteration to run) and ``num_iterations`` (T);
* ``step(t) -> metrics`` (with ``loss`` and ``seconds``) and an idempotent ``close()``;
* ``shard`` (a :class:`dm_plugins.distributed.ClassShard` or None) and ``classes`` (the range of
  classes it optimises, :func:`shard_classes`).

Given that, :func:`run_iterations` runs it, :func:`synthetic_state` / :func:`restore_synthetic`
are the part of its checkpoint every host has (a host adds its own entries beside them), and
:func:`image_step` is its image optimiser's step. A class-sharded host (the contract is
:mod:`dm_plugins.distributed`'s) takes its classes from :func:`shard_classes`, refuses networks
that couple a batch's images with :func:`check_batch_independent`, and logs the sums over the
ranks (:func:`sum_over_shards`, :func:`with_real_kept`). :func:`check_host_args` refuses bad
arguments before any work. None of them calls a plugin hook.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .chunking import batch_independent
from .distributed import ClassShard

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

__all__ = ["run_iterations", "check_host_args", "shard_classes", "check_batch_independent",
           "sum_over_shards", "with_real_kept", "image_step", "synthetic_state",
           "restore_synthetic"]


def run_iterations(host, start: Callable[[], None], callback: Callable[[int, dict], None] | None,
                   progress: bool, desc: str) -> torch.Tensor:
    """The run loop every host shares: ``start()``, then ``host.step(t)`` from
    ``host.iteration`` to ``host.num_iterations`` with a progress bar and ``callback(t,
    metrics)`` after each, ``host.close()`` whatever happens; returns ``host.syn`` detached."""
    bar = tqdm(range(host.iteration, host.num_iterations), total=host.num_iterations,
               initial=host.iteration, desc=desc, disable=not progress or tqdm is None)
    try:
        start()
        for t in bar:
            metrics = host.step(t)
            bar.set_postfix(loss=f"{metrics['loss']:.3g}", s_it=f"{metrics['seconds']:.2f}")
            if callback is not None:
                callback(t, metrics)
    finally:
        host.close()
    return host.syn.detach()


def check_host_args(owner: str, syn_init: torch.Tensor, num_classes: int, *,
                    positive: dict[str, int], nonnegative: dict[str, int] | None = None) -> int:
    """Refuse a host's bad arguments before any work: ``positive`` values must be >= 1,
    ``nonnegative`` ones >= 0, and ``syn_init`` must split evenly over the classes (sorted by
    class). Returns the images per class. Messages name ``owner`` (e.g. ``"DMHost"``)."""
    for name, value in positive.items():
        if int(value) < 1:
            raise ValueError(f"{owner}: {name} must be >= 1, got {value}")
    for name, value in (nonnegative or {}).items():
        if int(value) < 0:
            raise ValueError(f"{owner}: {name} must be >= 0, got {value}")
    if syn_init.shape[0] % num_classes:
        raise ValueError(f"{syn_init.shape[0]} synthetic images do not split evenly over "
                         f"{num_classes} classes")
    return syn_init.shape[0] // num_classes


# -- class sharding: what every host that can run class-sharded shares ----------------------
def shard_classes(owner: str, shard: ClassShard | None, num_classes: int) -> range:
    """The classes a host optimises: ``shard.classes``, or every class without a shard. A
    ValueError (naming ``owner``) when the shard splits another number of classes."""
    if shard is None:
        return range(num_classes)
    if shard.num_classes != num_classes:
        raise ValueError(f"{owner}: the shard splits {shard.num_classes} classes, the real "
                         f"data has {num_classes}")
    return shard.classes


def check_batch_independent(owner: str, network: nn.Module) -> None:
    """A ValueError unless ``network``'s forward treats the images of a batch independently
    (no BatchNorm in training mode): a class-sharded host whose forwards batch several classes
    would otherwise compute other numbers than one process."""
    if not batch_independent(network):
        raise ValueError(f"{owner}: a class-sharded host needs a network whose forward treats "
                         f"images independently (no BatchNorm in training mode)")


def sum_over_shards(shard: ClassShard | None, values: dict[str, float]) -> dict[str, float]:
    """``values`` summed over the ranks of a sharded run (one collective; every rank must pass
    the same keys in the same order), as they are without a shard or process group."""
    if shard is None:
        return {k: float(v) for k, v in values.items()}
    return dict(zip(values, shard.sum(list(values.values()))))


def with_real_kept(sums: dict[str, float]) -> dict[str, float]:
    """Metrics with the counts ``kept`` and ``drawn`` (real samples matched / drawn) replaced
    by their ratio ``real_kept`` (1 when nothing was drawn)."""
    out = {k: v for k, v in sums.items() if k not in ("kept", "drawn")}
    out["real_kept"] = sums["kept"] / max(sums["drawn"], 1)
    return out


def image_step(optimizer: torch.optim.Optimizer, syn: torch.Tensor,
               loss: torch.Tensor | None) -> None:
    """One step of the image optimiser on ``loss``'s gradient. ``loss`` None is the step of a
    class a sharded host does not hold: a zero gradient, so the held images move by their
    momentum exactly as in one process, where another class's step leaves their gradient zero
    (hosts that step class by class with one optimiser over every image, DANCE and IDM, call
    this for every class, held or not)."""
    optimizer.zero_grad(set_to_none=True)
    if loss is None:
        syn.grad = torch.zeros_like(syn)
    else:
        loss.backward()
    optimizer.step()


def synthetic_state(host, optimizer_state: dict) -> dict:
    """The part of a checkpoint every host has: next iteration, stored images (a CPU copy), the
    image optimiser's state and, for a sharded host (``host.shard`` set), its classes
    ``[first, last + 1]``."""
    state = {"iteration": host.iteration, "syn": host.syn.detach().cpu().clone(),
             "optimizer": optimizer_state}
    if getattr(host, "shard", None) is not None:
        state["classes"] = [host.classes.start, host.classes.stop]
    return state


def restore_synthetic(host, state: dict) -> None:
    """Load the part of a checkpoint every host has: the stored images ``syn`` (shape checked
    against ``host.syn``), the image optimiser's state and the next iteration. A state of other
    classes than the host's (another shard, or a whole run for a shard) is refused."""
    mine = (None if getattr(host, "shard", None) is None else
            [host.classes.start, host.classes.stop])
    if state.get("classes") != mine:
        raise ValueError(f"the state holds classes {state.get('classes', 'all')}, this host "
                         f"{mine or 'all'}")
    if tuple(state["syn"].shape) != tuple(host.syn.shape):
        raise ValueError(f"checkpoint holds synthetic images of shape "
                         f"{tuple(state['syn'].shape)}, this run expects {tuple(host.syn.shape)}")
    with torch.no_grad():
        host.syn.copy_(state["syn"].to(host.device))
    host.optimizer.load_state_dict(state["optimizer"])
    host.iteration = int(state["iteration"])
