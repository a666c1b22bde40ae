"""What happens after each distillation iteration, as callbacks in the manner of PyTorch
Lightning's ``Callback``: the non-finite guard, the metrics record, the heartbeat, the
checkpoint and the stop on a signal (:func:`default_callbacks`, in that order), with the snapshot
evaluation of :mod:`baselines.harness.snapshots` before the checkpoint when the run has one.

The host calls one function after every iteration (``host.run(callback=fn)``);
:class:`AfterIteration` is that function: it builds an :class:`IterationEnd` (in a run of
several processes the ranks first agree on whether to stop and whether the synthetic set is
still finite, so every rank takes the same decisions) and hands it to each callback's
``on_iteration_end``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .opening import OpenRun


@dataclass
class IterationEnd:
    """Iteration ``t`` has ended (``done = t + 1`` iterations are); ``metrics`` its record;
    ``syn`` the synthetic images to check (a NaN tensor when some rank's became non-finite,
    None when nothing is to be checked); ``stopping``: a signal asked the run to stop."""

    t: int
    metrics: dict
    syn: torch.Tensor | None
    stopping: bool

    @property
    def done(self) -> int:
        return self.t + 1


class Callback:
    """A hook of the distillation loop; ``run`` is the :class:`OpenRun` and ``host`` the host."""

    def on_iteration_end(self, run: "OpenRun", host, end: IterationEnd) -> None:
        pass


class NonFiniteGuard(Callback):
    """Stops the run (exit 2) at the first non-finite loss or synthetic image, before that
    state is logged or saved."""

    def on_iteration_end(self, run, host, end):
        from .guards import refuse_non_finite
        refuse_non_finite(end.t, end.metrics, end.syn, run.config, run.stop)


class MetricsRecord(Callback):
    """Every ``log_every`` iterations (and the last) a ``metrics.jsonl`` record with the peak
    memory (the largest of every rank's, and each rank's, in a run of several processes)."""

    def on_iteration_end(self, run, host, end):
        from dm_plugins import distributed

        from .runs import peak_memory_mb
        config = run.config
        if end.t % config["log_every"] and end.done != config["iterations"]:
            return
        end.metrics["peak_memory_mb"] = round(peak_memory_mb(run.device), 1)
        if run.sharded:
            peaks = distributed.all_gather_object(end.metrics["peak_memory_mb"])
            end.metrics["peak_memory_mb"] = max(peaks)
            end.metrics["peak_memory_mb_per_rank"] = peaks
        if run.main_rank:
            run.run_dir.append_metrics(end.metrics)


class HeartbeatLines(Callback):
    """Without progress bars (no terminal, or ``--no-progress``), a ``distill t/T`` line every
    ``log_every`` iterations with the losses and ``real_kept``."""

    def __init__(self, run: "OpenRun", start: int):
        from dm_plugins.heartbeat import Heartbeat
        self.beat = Heartbeat(run.log, "distill", run.config["iterations"],
                              run.config["log_every"], start=start)

    def on_iteration_end(self, run, host, end):
        self.beat(end.done, **{k: v for k, v in end.metrics.items()
                               if k.startswith("loss") or k == "real_kept"})


class Checkpoint(Callback):
    """A checkpoint (the host's state, the iteration and the config) every
    ``checkpoint_every`` iterations, after the last, and when a signal asked to stop."""

    def on_iteration_end(self, run, host, end):
        config = run.config
        if (end.done % config["checkpoint_every"] == 0 or end.done == config["iterations"]
                or end.stopping):
            run.run_dir.save_checkpoint({"host": host.state_dict(), "iteration": end.done,
                                         "config": config})
            run.stop.checkpoint = end.done


class StopOnSignal(Callback):
    """Ends the run (as KeyboardInterrupt, which the driver turns into exit 130 / 143) after
    the checkpoint of the iteration a SIGINT / SIGTERM arrived in."""

    def on_iteration_end(self, run, host, end):
        if end.stopping:
            raise KeyboardInterrupt


def default_callbacks(run: "OpenRun", start: int, snapshots: Callback | None = None
                      ) -> list[Callback]:
    """The driver's callbacks, in the order they run; ``snapshots`` (the
    :class:`~baselines.harness.snapshots.SnapshotEvaluation` of a run with ``--eval-at``) goes
    before the checkpoint, so a checkpoint at t implies the snapshots up to t."""
    beat = [] if run.progress else [HeartbeatLines(run, start)]
    kept = [snapshots] if snapshots is not None else []
    return [NonFiniteGuard(), MetricsRecord(), *beat, *kept, Checkpoint(), StopOnSignal()]


class AfterIteration:
    """The function the host calls after each iteration: the callbacks in order."""

    def __init__(self, run: "OpenRun", host, callbacks: Sequence[Callback]):
        self.run, self.host, self.callbacks = run, host, list(callbacks)

    def __call__(self, t: int, metrics: dict) -> None:
        from dm_plugins import distributed
        syn = getattr(self.host, "syn", None)
        stopping = self.run.stop.signum is not None
        if self.run.sharded:  # one collective: every rank takes the same decisions
            bad = isinstance(syn, torch.Tensor) and not bool(torch.isfinite(syn.detach()).all())
            stopping, bad = distributed.any_rank(stopping, bad)
            syn = torch.tensor(float("nan")) if bad else None
        end = IterationEnd(t=t, metrics=metrics, syn=syn, stopping=stopping)
        for callback in self.callbacks:
            callback.on_iteration_end(self.run, self.host, end)
