"""How far the cells of an ablation are, and what the unfinished ones still cost.

Contract: :func:`cell_progress` reads one cell's run directory, without loading torch or taking
its lock: the iterations reached (the last ``metrics.jsonl`` record), the snapshot points
evaluated, and two measured costs, the median seconds per distillation iteration (the
``seconds`` of the last :data:`RECENT` records) and the median seconds one point's evaluation
took (from the ``iter-<t>.pt`` file's modification time to its ``.json``'s, which the run writes
in that order around the evaluation). :func:`remaining` turns them into what is left; a cell
without its own measurements (not started yet) borrows the median of the cells that have them.
CPU-hours are wall seconds times the cell's threads (``config.json``'s ``environment``).
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from .dir_lock import DirectoryLock
from .plots import read_metrics
from .runs import RunDir
from .snapshots import read_point, snapshot_points

RECENT = 100
"""How many of the latest ``metrics.jsonl`` records the s/iter median is taken over."""


@dataclass
class CellProgress:
    """One cell: its state (``finished``, ``running``, ``stopped`` or ``not started``), the
    iterations reached of ``iterations``, the snapshot points evaluated of ``points``, and the
    measured ``seconds_per_iteration`` / ``seconds_per_point`` (None when not measured)."""

    name: str
    state: str
    reached: int
    iterations: int | None
    evaluated: int
    points: int
    seconds_per_iteration: float | None
    seconds_per_point: float | None
    threads: int


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def point_seconds(run: RunDir) -> list[float]:
    """Seconds each evaluated snapshot took: its ``.json``'s mtime minus its ``.pt``'s."""
    seconds = []
    for result in sorted(run.snapshots_path.glob("iter-*.json")):
        kept = result.with_suffix(".pt")
        if kept.is_file() and read_point(result) is not None:
            seconds.append(result.stat().st_mtime - kept.stat().st_mtime)
    return seconds


def cell_progress(name: str, run_dir: Path, finished: bool) -> CellProgress:
    """The progress of the cell ``name`` whose run directory is ``run_dir``."""
    run = RunDir(run_dir)
    config = _read_json(run.config_path)
    if config is None or not isinstance(config.get("iterations"), int):
        return CellProgress(name, "finished" if finished else "not started", 0, None, 0, 0,
                            None, None, 1)
    iterations = config["iterations"]
    records = [r for r in read_metrics(run.metrics_path) if isinstance(r.get("iteration"), int)]
    reached = iterations if finished else (records[-1]["iteration"] + 1 if records else 0)
    seconds = [float(r["seconds"]) for r in records[-RECENT:]
               if isinstance(r.get("seconds"), (int, float))]
    evaluated = point_seconds(run)
    points = len(snapshot_points(config))
    if finished:
        state = "finished"
    elif DirectoryLock(run.path).in_use():
        state = "running"
    else:
        state = "stopped" if records else "not started"
    threads = int((config.get("environment") or {}).get("threads") or 1)
    return CellProgress(name, state, reached, iterations, len(evaluated), points,
                        statistics.median(seconds) if seconds else None,
                        statistics.median(evaluated) if evaluated else None, threads)


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def remaining(cells: list[CellProgress], iterations: int, points: int,
              threads: int) -> list[tuple[CellProgress, int, int, float | None]]:
    """``(cell, iterations left, points left, CPU-hours left or None)`` for every cell;
    ``iterations``, ``points`` and ``threads`` stand in for a cell that has no config yet.
    A point is counted once its evaluation is written; a cell without measurements uses the
    median of the others'."""
    per_iteration = _median([c.seconds_per_iteration for c in cells])
    per_point = _median([c.seconds_per_point for c in cells])
    rows = []
    for cell in cells:
        total = cell.iterations if cell.iterations is not None else iterations
        cell_points = cell.points if cell.iterations is not None else points
        left = 0 if cell.state == "finished" else max(0, total - cell.reached)
        points_left = 0 if cell.state == "finished" else max(0, cell_points - cell.evaluated)
        s_iter = cell.seconds_per_iteration or per_iteration
        s_point = cell.seconds_per_point or per_point
        if cell.state == "finished":
            hours = 0.0
        elif s_iter is None or (points_left and s_point is None):
            hours = None
        else:
            hours = (left * s_iter + points_left * (s_point or 0.0)) * \
                (cell.threads if cell.iterations is not None else threads) / 3600
        rows.append((cell, left, points_left, hours))
    return rows


def progress_markdown(rows: list[tuple[CellProgress, int, int, float | None]]) -> str:
    """The progress table of :func:`remaining`'s rows and a one-line total."""
    def number(value, digits):
        return "-" if value is None else f"{value:.{digits}f}"
    lines = ["| cell | state | iterations | points evaluated | s/iter | s/point | "
             "CPU-hours left |", "|---|---|---:|---:|---:|---:|---:|"]
    for cell, left, points_left, hours in rows:
        total = "?" if cell.iterations is None else str(cell.iterations)
        points = "?" if cell.iterations is None else str(cell.points)
        lines.append(f"| {cell.name} | {cell.state} | {cell.reached}/{total} | "
                     f"{cell.evaluated}/{points} | {number(cell.seconds_per_iteration, 2)} | "
                     f"{number(cell.seconds_per_point, 0)} | {number(hours, 1)} |")
    unfinished = [r for r in rows if r[0].state != "finished"]
    hours = [r[3] for r in unfinished]
    total = "unknown" if None in hours else f"{sum(hours):.1f}"
    lines += ["", f"Remaining: {len(unfinished)} of {len(rows)} cells, "
                  f"{sum(r[1] for r in unfinished)} iterations, "
                  f"{sum(r[2] for r in unfinished)} snapshot evaluations, about {total} "
                  f"CPU-hours (measured s/iter and s/point; a cell with none borrows the "
                  f"others' median)."]
    return "\n".join(lines) + "\n"
