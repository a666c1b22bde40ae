"""One run as a short sequence of phases:

1. :func:`~baselines.harness.opening.open_run`: check the settings, create or resume the run
   directory;
2. :func:`~baselines.harness.building.build_run`: experts, plugins, host, checkpoint;
3. :func:`distil`: the host's loop with the callbacks of :mod:`baselines.harness.callbacks`;
4. :func:`save`: ``synthetic.pt``, ``grid.png``, ``curves.png``;
5. :func:`evaluate`: train networks on the synthetic set, write ``results.json``.

With ``--eval-at`` / ``--eval-every`` the set is also kept and evaluated at those iterations
(:mod:`baselines.harness.snapshots`): a resumed run first evaluates the points it passed
without an evaluation, then distils on.

In a run of several processes (``world.distributed``) every rank runs every phase on its own
classes; rank 0 alone writes the run directory, and the ranks meet where noted.
"""
from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from .building import BuiltRun, build_run
from .callbacks import AfterIteration, Callback, default_callbacks
from .opening import OpenRun, open_run
from .snapshots import (SnapshotEvaluation, curve_with_final, evaluate_set, read_point,
                        snapshot_points)
from .spec import MethodSpec

if TYPE_CHECKING:  # pragma: no cover
    from dm_plugins.distributed import World

    from .guards import StopRequest


def run(spec: MethodSpec, args: argparse.Namespace,
        explicit: frozenset[str] | set[str] = frozenset(), stop: "StopRequest | None" = None,
        world: "World | None" = None,
        callbacks: Sequence[Callback] | None = None) -> int:
    """One run (new, or ``args.resume``): distil, save, evaluate; 0, or raises user errors.

    ``world`` (a :class:`dm_plugins.distributed.World`, default one process): with K > 1
    processes every rank joins torchrun's process group (gloo on CPU, NCCL on CUDA), holds only
    its classes (:func:`dm_plugins.distributed.class_range`) of the real training images (all
    of them when the spec ``needs_every_class``) and of the synthetic set, and writes its own
    ``checkpoint-rank<r>.pt``. Rank 0 alone loads the data first (downloads and caches),
    creates the run directory and writes everything else. Missing experts are trained by every
    rank, expert k by rank k % K, and then loaded by all (the pool equals a serial one). The
    evaluation runs are dealt over the ranks and gathered. ``--resume`` needs the same K.
    ``callbacks`` replace :func:`~baselines.harness.callbacks.default_callbacks`.
    """
    from dm_plugins import distributed

    from .guards import StopRequest
    stop = stop if stop is not None else StopRequest()
    world = world if world is not None else distributed.World()
    opened = open_run(spec, args, explicit, stop, world)
    built = build_run(opened)
    opened.log.release()
    if opened.main_rank and not opened.created:  # records past the checkpoint are redone
        opened.run_dir.truncate_metrics(built.host.iteration)
    if built.checkpoint is not None:
        stop.checkpoint = built.host.iteration
        opened.log(f"resumed at iteration {built.host.iteration} of "
                   f"{opened.config['iterations']}")
    snapshots = SnapshotEvaluation(opened) if snapshot_points(opened.config) else None
    if snapshots is not None:
        snapshots.catch_up(opened, built.host)
    stored = distil(opened, built, callbacks, snapshots)
    if opened.main_rank:
        save(opened, stored)
    if opened.config["eval_runs"] > 0:
        evaluate(opened, built, stored)
    return 0


def distil(run: OpenRun, built: BuiltRun, callbacks: Sequence[Callback] | None = None,
           snapshots: SnapshotEvaluation | None = None) -> torch.Tensor:
    """The host's loop from its iteration to the end; the whole stored set, normalised, in
    class order (gathered from every rank in a run of several processes). ``snapshots`` joins
    the default callbacks (``callbacks`` replace them, snapshots included)."""
    from dm_plugins import distributed

    from .runs import peak_memory_mb
    host = built.host
    if callbacks is None:
        callbacks = default_callbacks(run, start=host.iteration, snapshots=snapshots)
    started = time.perf_counter()
    run.stop.in_loop = True
    try:
        stored = host.run(callback=AfterIteration(run, host, callbacks), progress=run.progress)
    finally:
        run.stop.in_loop = False
    if run.spec.stores_pixels:  # e.g. DANCE: pixel space -> normalised
        stored = run.dataset.normalize(stored.detach().cpu())
    peak = f"{peak_memory_mb(run.device):.0f} MiB"
    if run.sharded:  # every rank gets the whole set, in class order
        stored = distributed.all_gather_rows(stored.detach())
        peaks = distributed.all_gather_object(round(peak_memory_mb(run.device)))
        peak = f"{max(peaks)} MiB (per process: {', '.join(map(str, peaks))})"
    run.log(f"distillation done: {run.config['iterations']} iterations in "
            f"{time.perf_counter() - started:.1f} s, peak memory {peak}")
    return stored


def save(run: OpenRun, stored: torch.Tensor) -> None:
    """``synthetic.pt``, ``grid.png`` and ``curves.png`` (rank 0), after a warning when most
    pixels are saturated."""
    from .common import save_synthetic
    from .guards import warn_if_saturated
    config, run_dir = run.config, run.run_dir
    warn_if_saturated(run.dataset, stored, config, run.log)
    save_synthetic(run_dir, run.dataset, stored, ipc=config["ipc"], factor=config["factor"],
                   method=config["method"], plugins=config["plugins"], config=config,
                   seed=config["seed"])
    run.log(f"wrote {run_dir.synset_path} and {run_dir.grid_path}")
    write_curves(run_dir, run.log)


def evaluate(run: OpenRun, built: BuiltRun, stored: torch.Tensor) -> None:
    """The evaluation runs (dealt over the ranks), then ``results.json`` (rank 0): the first
    architecture's summary, every architecture's under ``per_arch``, the run's identity and
    the experts' test accuracy; with snapshots also ``curve``, the final set's evaluation
    taken from its snapshot (it is the same set) rather than run twice."""
    from dm_plugins import distributed
    config = run.config
    summary = None
    if run.main_rank and config["iterations"] in snapshot_points(config):
        summary = read_point(run.run_dir.snapshot_result_path(config["iterations"]))
    if not distributed.broadcast_object(summary is not None):  # rank 0 read it or not
        summary = evaluate_set(run, stored)
    if not run.main_rank:
        return
    summary.pop("iteration", None)
    summary.update({"method": config["method"], "plugins": config["plugins"],
                    "ipc": config["ipc"], "dataset": run.dataset.name,
                    "iterations": config["iterations"]})
    if snapshot_points(config):
        summary["curve"] = curve_with_final(run, summary)
    if "preset" in config:
        summary["preset"] = config["preset"]
    if built.experts is not None:
        summary["expert_test_accuracy"] = [e.meta.get("test_accuracy")
                                           for e in built.experts.experts]
    run.run_dir.write_results(summary)
    run.log(f"wrote {run.run_dir.results_path}")


def write_curves(run_dir, log: Callable[[str], None]) -> None:
    """``curves.png`` of the run's ``metrics.jsonl`` (loss parts and ``real_kept`` over
    iterations, atomically); a failure to plot is a warning, never a failed run."""
    try:
        from .plots import plot_curves, read_metrics
        plot_curves([(run_dir.path.name, read_metrics(run_dir.metrics_path))],
                    run_dir.curves_path)
    except Exception as exc:  # noqa: BLE001 - plotting must never fail a finished run
        log(f"warning: could not write {run_dir.curves_path} ({type(exc).__name__}: {exc})")
        return
    log(f"wrote {run_dir.curves_path}")
