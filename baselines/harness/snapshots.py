"""Snapshots: the synthetic set kept and evaluated at chosen iterations, for a curve of test
accuracy against distillation iteration (``--eval-at T1,T2,...`` / ``--eval-every N``).

The original DM code evaluates its set every 2,000 iterations; a run with snapshots does the
same with the run's own evaluation protocol, runs, epochs and architectures. Snapshot ``t`` is
the set after ``t`` iterations (0: the initial set, T: the final one). For each point the run
writes, in this order and each atomically:

- ``RUN/snapshots/iter-<t>.pt``: the set, in ``synthetic.pt``'s format (``evaluate.py RUN
  --snapshot t`` re-evaluates it);
- ``RUN/snapshots/iter-<t>.json``: its evaluation (``results.json``'s schema plus
  ``iteration``), written only once the evaluation is complete.

A point is evaluated from the pixels its file holds, so a run killed while it evaluated a point
re-evaluates exactly that set on ``--resume`` and gets the same numbers; points whose ``.json``
exists are never evaluated again. The snapshot callback runs before the checkpoint of its
iteration, so a checkpoint at ``t`` implies the set file of every point up to ``t``. The
evaluations fork the global RNG (see :func:`~baselines.harness.evaluation.evaluate_synset`) and
the hosts draw from their own generators, so a run with snapshots distils exactly the set a run
without them does.

``results.json`` gains ``curve``: one entry per point (``iteration``, ``accuracy_mean``,
``accuracy_std``, ``runs``, ``accuracies``, ``arch``), the final set always among them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .callbacks import Callback
from .synset import atomic_write_json, load_synset

if TYPE_CHECKING:  # pragma: no cover
    from .opening import OpenRun

CURVE_KEYS = ("iteration", "accuracy_mean", "accuracy_std", "runs", "accuracies", "arch")
"""What each point of ``results.json``'s ``curve`` records."""


def snapshot_points(config: dict) -> list[int]:
    """The iterations a run keeps and evaluates its set at: ``eval_at``, and with ``eval_every``
    N > 0 also 0, N, 2N, ... and the last iteration; empty without either."""
    total = int(config["iterations"])
    points = {int(p) for p in config.get("eval_at") or ()}
    every = int(config.get("eval_every") or 0)
    if every > 0:
        points.update(range(0, total + 1, every))
        points.add(total)
    return sorted(p for p in points if 0 <= p <= total)


def host_set(run: "OpenRun", host) -> torch.Tensor:
    """The host's stored set now, normalised, in class order (gathered from every rank of a
    sharded run): what :func:`~baselines.harness.phases.distil` returns at the end."""
    from dm_plugins import distributed
    stored = host.syn.detach()
    if run.spec.stores_pixels:  # e.g. DANCE: pixels, clamped as its run() returns them
        stored = run.dataset.normalize(stored.clamp(0.0, 1.0).cpu())
    if run.sharded:
        stored = distributed.all_gather_rows(stored)
    return stored.cpu()


def evaluate_set(run: "OpenRun", stored: torch.Tensor) -> dict | None:
    """Evaluate a normalised set with the run's protocol, runs, epochs and architectures (the
    runs dealt over the ranks of a sharded run); ``results.json``'s summary on rank 0 (the first
    architecture's result, every architecture's under ``per_arch``), None on the others."""
    from dm_plugins import distributed

    from .common import evaluate_stored
    config = run.config
    results = evaluate_stored(
        run.dataset, stored, ipc=config["ipc"], factor=config["factor"],
        archs=config["eval_arch"], runs=config["eval_runs"], epochs=config["eval_epochs"],
        protocol=config["eval_protocol"], seed=config["seed"], device=run.device,
        progress=run.progress, channels_last=run.channels_last,
        compile=config.get("eval_compile", False), log=run.log, rank=run.world.rank,
        world_size=run.world.world_size, gather=distributed.all_gather_object)
    if not run.main_rank:
        return None
    summary = dict(results[0])
    summary["per_arch"] = results
    return summary


def read_point(path: Path) -> dict | None:
    """One snapshot's evaluation (``iter-<t>.json``), None when missing or unreadable."""
    try:
        point = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return point if isinstance(point, dict) and "iteration" in point else None


def read_points(run_dir: str | Path) -> list[dict]:
    """Every evaluated snapshot of a run directory, by iteration, as written (a run still
    distilling has a partial curve); unreadable ones are left out."""
    folder = Path(run_dir) / "snapshots"
    points = [read_point(p) for p in sorted(folder.glob("iter-*.json"))]
    return [p for p in points if p is not None]


def read_curve(run_dir: str | Path) -> list[dict]:
    """The :data:`CURVE_KEYS` of each of :func:`read_points`."""
    return [{k: p.get(k) for k in CURVE_KEYS} for p in read_points(run_dir)]


class SnapshotEvaluation(Callback):
    """Keeps and evaluates the set at every point of :func:`snapshot_points` (before that
    iteration's checkpoint); :meth:`catch_up` does the points a resumed run has passed."""

    def __init__(self, run: "OpenRun"):
        self.points = set(snapshot_points(run.config))

    def on_iteration_end(self, run, host, end):
        if end.done in self.points:
            self.take(run, host, end.done)

    def take(self, run: "OpenRun", host, iteration: int) -> None:
        """Write the host's set as point ``iteration``, then evaluate it."""
        stored = host_set(run, host)
        pixels = run.dataset.denormalize(stored).clamp(0, 1)  # exactly what the file holds
        if run.main_rank:
            from .common import save_synthetic
            config = run.config
            save_synthetic(run.run_dir, run.dataset, stored, ipc=config["ipc"],
                           factor=config["factor"], method=config["method"],
                           plugins=config["plugins"], config=config, seed=config["seed"],
                           path=run.run_dir.snapshot_set_path(iteration),
                           extra_meta={"snapshot_iteration": int(iteration)})
        self.evaluate(run, iteration, pixels)

    def evaluate(self, run: "OpenRun", iteration: int, pixels: torch.Tensor) -> None:
        """Evaluate point ``iteration`` from its pixels; rank 0 writes ``iter-<t>.json`` and
        logs the point."""
        summary = evaluate_set(run, run.dataset.normalize(pixels))
        if summary is None:
            return
        summary["iteration"] = int(iteration)
        atomic_write_json(run.run_dir.snapshot_result_path(iteration), summary)
        run.log(f"snapshot {iteration}/{run.config['iterations']}: {summary['arch']} "
                f"{summary['accuracy_mean']:.2f} +- {summary['accuracy_std']:.2f} over "
                f"{summary['runs']} runs")

    def catch_up(self, run: "OpenRun", host) -> None:
        """Before the loop: evaluate every point up to the host's iteration that has no
        evaluation yet (from its set file; the current set when the point is the iteration the
        run starts at). Rank 0 decides, every rank follows."""
        from dm_plugins import distributed
        for iteration in sorted(p for p in self.points if p <= host.iteration):
            action = self._pending(run, iteration, host.iteration)
            if run.sharded:
                action = distributed.broadcast_object(action)
            if action == "take":
                self.take(run, host, iteration)
            elif action == "file":
                pixels = self._file_pixels(run, iteration)
                self.evaluate(run, iteration, pixels)
            elif action == "lost":
                run.log(f"warning: snapshot {iteration} has no set file in "
                        f"{run.run_dir.snapshots_path} and the run is past it; its point is "
                        f"missing from the curve")

    def _pending(self, run: "OpenRun", iteration: int, current: int) -> str:
        if not run.main_rank:
            return ""
        if run.run_dir.snapshot_result_path(iteration).is_file():
            return "done"
        if run.run_dir.snapshot_set_path(iteration).is_file():
            return "file"
        return "take" if iteration == current else "lost"

    def _file_pixels(self, run: "OpenRun", iteration: int) -> torch.Tensor:
        from dm_plugins import distributed
        pixels: Any = None
        if run.main_rank:
            pixels = load_synset(run.run_dir.snapshot_set_path(iteration)).images
        if run.sharded:
            pixels = distributed.broadcast_object(pixels)
        return pixels


def curve_with_final(run: "OpenRun", final: dict) -> list[dict]:
    """``results.json``'s ``curve``: every evaluated point, the final set as point T (from its
    snapshot when T is one, else from ``final``)."""
    total = int(run.config["iterations"])
    points = [p for p in read_curve(run.run_dir.path) if p["iteration"] != total]
    points.append({k: final.get(k) for k in CURVE_KEYS} | {"iteration": total})
    return sorted(points, key=lambda p: p["iteration"])
