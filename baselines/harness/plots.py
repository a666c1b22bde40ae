"""The figures the command lines write (matplotlib, Agg backend, no display needed).

* :func:`plot_curves`: one panel per loss part (every ``metrics.jsonl`` key starting with
  ``loss``) and one for ``real_kept``, over iterations, one line per run (``curves.png``);
* :func:`plot_grids`: image grids side by side, each titled (``grids.png``);
* :func:`plot_bars`: mean accuracy with ± std error bars per row, one bar per series
  (``ablation.png``).

Every figure is written atomically (temp file in the target's directory, then ``os.replace``).
"""
from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

from dm_plugins.atomic import atomic_write_bytes

_PER_ROW = 3
_MAX_LEGEND = 12


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str | os.PathLike) -> None:
    """Write ``fig`` as a PNG to ``path`` atomically, then close it."""
    plt = pyplot()
    try:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl`` (none when the file is missing); a line torn by a kill
    or that is not a JSON object is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def curve_keys(records: Sequence[dict]) -> list[str]:
    """The keys :func:`plot_curves` draws: ``loss``, ``loss_match``, the other ``loss*`` keys
    alphabetically, then ``real_kept``; only those with a number in some record."""
    present = {key for r in records for key, value in r.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    losses = sorted((k for k in present if k.startswith("loss")),
                    key=lambda k: ({"loss": 0, "loss_match": 1}.get(k, 2), k))
    return losses + (["real_kept"] if "real_kept" in present else [])


def plot_curves(runs: Sequence[tuple[str, Sequence[dict]]], path: str | os.PathLike) -> None:
    """``runs`` = ``(label, metrics records)`` pairs: one panel per :func:`curve_keys` key, x =
    ``iteration``, one line per run. With no curve at all the figure says so."""
    plt = pyplot()
    keys = curve_keys([r for _, records in runs for r in records])
    if not keys:
        fig, ax = plt.subplots(figsize=(4, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "no metrics.jsonl records", ha="center", va="center")
        save_figure(fig, path)
        return
    cols = min(_PER_ROW, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for label, records in runs:
            points = [(r["iteration"], r[key]) for r in records
                      if key in r and isinstance(r.get("iteration"), int)]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, label=label, marker="." if len(xs) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("iteration")
        if key.startswith("loss") and all(y > 0 for line in ax.get_lines()
                                          for y in line.get_ydata()):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if len(runs) <= _MAX_LEGEND:
        axes.flat[0].legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)


def plot_accuracy_vs(series: Mapping[str, Sequence[tuple[float, float, float]]], xlabel: str,
                     path: str | os.PathLike) -> None:
    """``series`` = label -> ``(x, accuracy mean, std)`` points: one line with error bars per
    label, points in x order (e.g. accuracy against the number of iterations, one line per
    plugin subset)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, points in series.items():
        xs, means, stds = zip(*sorted(points))
        ax.errorbar(xs, means, yerr=stds, label=label, marker="o", capsize=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    if len(series) <= _MAX_LEGEND:
        ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)


def plot_accuracy_curves(series: Mapping[str, Sequence[tuple[float, float, float]]],
                         path: str | os.PathLike, title: str | None = None) -> None:
    """``series`` = label -> ``(iteration, accuracy mean, std)`` points: one line per label
    with a shaded mean +- std band (test accuracy against distillation iteration)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    for label, points in series.items():
        if not points:
            continue
        xs, means, stds = (list(v) for v in zip(*sorted(points)))
        line, = ax.plot(xs, means, marker="o", markersize=3, label=label)
        ax.fill_between(xs, [m - s for m, s in zip(means, stds)],
                        [m + s for m, s in zip(means, stds)], color=line.get_color(), alpha=0.2)
    ax.set_xlabel("distillation iteration")
    ax.set_ylabel("test accuracy (%)")
    if title:
        ax.set_title(title, fontsize="small")
    ax.grid(alpha=0.3)
    if 0 < len([p for p in series.values() if p]) <= _MAX_LEGEND:
        ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)


def plot_grids(grids: Sequence[tuple[str, str | os.PathLike]], path: str | os.PathLike) -> None:
    """``grids`` = ``(title, image file)`` pairs, drawn side by side (up to 4 a row)."""
    from matplotlib import image as mpimg
    plt = pyplot()
    if not grids:
        raise ValueError("no image grid to draw")
    cols = min(4, len(grids))
    rows = math.ceil(len(grids) / cols)
    images = [mpimg.imread(os.fspath(p)) for _, p in grids]
    aspect = max(img.shape[0] / img.shape[1] for img in images)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * aspect * rows + 0.5 * rows),
                             squeeze=False)
    for ax, (title, _), img in zip(axes.flat, grids, images):
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
        ax.set_title(title, fontsize="small")
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)


def zoomed_limits(means: Sequence[float], stds: Sequence[float]) -> tuple[float, float] | None:
    """Y limits that show the differences between bars of close values (an ablation's
    accuracies are often within a few points): from half the spread of ``mean ± std`` (at least
    one unit) below the lowest to a third of it above the highest, never below 0. None when no
    value is finite (matplotlib's own limits)."""
    lows = [m - (s if math.isfinite(s) else 0.0) for m, s in zip(means, stds) if math.isfinite(m)]
    highs = [m + (s if math.isfinite(s) else 0.0) for m, s in zip(means, stds) if math.isfinite(m)]
    if not lows:
        return None
    span = max(max(highs) - min(lows), 1.0)
    return max(0.0, min(lows) - span / 2), max(highs) + span / 3


def plot_bars(labels: Sequence[str], series: Mapping[str, tuple[Sequence[float],
                                                                Sequence[float]]],
              path: str | os.PathLike, *, title: str = "", ylabel: str = "accuracy (%)",
              reference: str | None = None) -> None:
    """One group of bars per label; ``series`` maps a name to (means, stds), one per label
    (NaN where a label has no value: no bar). The y axis is zoomed onto the values
    (:func:`zoomed_limits`, so it does not start at 0); ``reference``, a label, draws a dashed
    line at that label's mean of each series (e.g. ``none`` in an ablation)."""
    plt = pyplot()
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(labels) + 1.5), 3.5))
    for i, (name, (means, stds)) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right")
    limits = zoomed_limits([m for means, _ in series.values() for m in means],
                           [s for _, stds in series.values() for s in stds])
    if limits is not None:
        ax.set_ylim(*limits)
    if reference in labels:
        for name, (means, _) in series.items():
            value = means[list(labels).index(reference)]
            if math.isfinite(value):
                ax.axhline(value, linestyle="--", linewidth=1, color="0.3")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize="medium")
    if len(series) > 1:
        ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
