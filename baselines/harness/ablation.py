"""The ablation directory of ``baselines/ablate.py``: its cells, their results, its tables.

Contract: a :class:`Cell` is one (plugin subset, seed) of an ablation; under the ablation
directory ``OUT`` it runs in ``OUT/cells/<subset>-s<seed>`` and logs to
``OUT/logs/<subset>-s<seed>.log`` (``<subset>`` is ``none`` or the plugins joined by ``+``,
:func:`subset_name`). :func:`read_results` reads a cell's ``results.json`` back (None while it is
unfinished or unreadable). :func:`write_outputs` writes ``OUT/ablation.csv``, ``ablation.md`` and
``ablation.png`` from the finished cells alone, atomically, naming the unfinished ones, and
``curves.csv`` / ``curves.png`` from the evaluated snapshots of every cell, finished or not
(``--eval-every`` / ``--eval-at``); ``ablation.md`` also gets the curves' table and each cell's
progress (:mod:`.study_progress`). It can be called at any time, as often as wanted. Nothing here starts a process or handles a signal: the
runner (``baselines/ablate.py``) does.
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from dm_plugins.atomic import atomic_write_bytes

from .plots import plot_accuracy_curves, plot_bars
from .snapshots import read_points, snapshot_points
from .study_progress import cell_progress, progress_markdown, remaining

__all__ = ["Cell", "subset_name", "read_results", "collect", "summarize", "markdown",
           "collect_curves", "summarize_curves", "curves_markdown", "write_outputs"]


def subset_name(subset: list[str]) -> str:
    """``["cap", "ptm"]`` -> ``"cap+ptm"``; ``[]`` -> ``"none"`` (a row of the tables)."""
    return "+".join(subset) or "none"


@dataclass(frozen=True)
class Cell:
    """One (plugin subset, seed) of an ablation: one run of the method."""

    subset: tuple[str, ...]
    seed: int

    @property
    def name(self) -> str:
        return f"{subset_name(list(self.subset))}-s{self.seed}"

    def run_dir(self, out: Path) -> Path:
        return out / "cells" / self.name

    def log_path(self, out: Path) -> Path:
        return out / "logs" / f"{self.name}.log"


def read_results(run_dir: Path) -> dict | None:
    """A cell's ``results.json`` (a dict), or None when absent, unreadable or not a dict."""
    path = run_dir / "results.json"
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) else None


# -- the tables -------------------------------------------------------------------------------
def collect(cells: list[Cell], out: Path) -> list[dict]:
    """One row per evaluation run of every finished cell (the rows of ``ablation.csv``)."""
    rows = []
    for cell in cells:
        results = read_results(cell.run_dir(out))
        if results is None:
            continue
        for arch_result in results.get("per_arch") or [results]:
            for i, accuracy in enumerate(arch_result.get("accuracies", [])):
                rows.append({"subset": subset_name(list(cell.subset)), "seed": cell.seed,
                             "arch": arch_result.get("arch", "convnet"), "eval_run": i,
                             "accuracy": accuracy,
                             "run_dir": str(Path("cells") / cell.name)})
    return rows


def summarize(rows: list[dict], subsets: list[str]) -> dict[str, dict[str, tuple]]:
    """arch -> subset -> (mean, population std, n) over every accuracy of that subset."""
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    table: dict[str, dict[str, tuple]] = {}
    for arch in archs:
        table[arch] = {}
        for subset in subsets:
            values = [r["accuracy"] for r in rows if r["arch"] == arch and r["subset"] == subset]
            table[arch][subset] = ((statistics.fmean(values), statistics.pstdev(values),
                                    len(values)) if values else (math.nan, math.nan, 0))
    return table


def markdown(settings: dict, config: dict, table: dict, cells: list[Cell], out: Path,
             experts: list[float] | None) -> str:
    archs = list(table) or [config["eval_arch"][0]]
    lines = [f"# Ablation: {settings['method']}, preset {config.get('preset')}, "
             f"{config['dataset']}, IPC {config['ipc']}, {config['iterations']} iterations", "",
             f"Seeds {', '.join(map(str, settings['seeds']))}; each cell evaluated "
             f"{config['eval_runs']} x {config['eval_epochs']} epochs "
             f"({config['eval_protocol']} protocol). Accuracy: final-epoch test accuracy (%), "
             f"mean ± population std over every evaluation run of every seed; n: their number.",
             ""]
    if experts:
        lines += [f"Experts (one pool, expert seed {config.get('expert_seed')}): "
                  f"{len(experts)} x {config['arch']}, test accuracy "
                  f"{', '.join(f'{a:.1f}' for a in experts)} "
                  f"(mean {statistics.fmean(experts):.2f}).", ""]
    header = ["plugins"] + [h for arch in archs for h in (f"{arch} accuracy (%)", "n")]
    lines += ["| " + " | ".join(header) + " |",
              "|---|" + "---:|---:|" * len(archs)]
    for subset in settings["subsets"]:
        cells_text = []
        for arch in archs:
            mean, std, n = table.get(arch, {}).get(subset, (math.nan, math.nan, 0))
            cells_text += ["-" if n == 0 else f"{mean:.2f} ± {std:.2f}", str(n)]
        lines.append("| " + " | ".join([subset, *cells_text]) + " |")
    missing = [c.name for c in cells if read_results(c.run_dir(out)) is None]
    if missing:
        lines += ["", f"Not finished: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def dataset_label(dataset: str) -> str:
    """A dataset spec as a figure's title names it: a folder by its last component
    (``imagefolder:/data/cifar10-mini`` -> ``imagefolder:cifar10-mini``), so a figure does not
    carry the machine's paths."""
    kind, _, path = dataset.partition(":")
    return f"{kind}:{path.rstrip('/').split('/')[-1]}" if path else dataset


def write_outputs(out: Path, settings: dict, config: dict, cells: list[Cell]) -> None:
    """``ablation.csv``, ``ablation.md`` and ``ablation.png`` from the finished cells."""
    rows = collect(cells, out)
    _write_csv(out / "ablation.csv", rows, ["subset", "seed", "arch", "eval_run", "accuracy",
                                            "run_dir"])
    table = summarize(rows, settings["subsets"])
    experts = next((r["expert_test_accuracy"] for c in cells
                    if (r := read_results(c.run_dir(out))) and r.get("expert_test_accuracy")),
                   None)
    text = markdown(settings, config, table, cells, out, experts)
    curve_rows = collect_curves(cells, out)
    if curve_rows or snapshot_points(config):
        text += "\n" + curves_markdown(curve_rows, settings["subsets"], cells)
        _write_csv(out / "curves.csv", curve_rows, CURVE_COLUMNS)
        series = summarize_curves(curve_rows, settings["subsets"])
        arch = next(iter(series), None)
        plot_accuracy_curves(
            {subset: [(it, mean, std) for it, mean, std, _, _ in points]
             for subset, points in (series[arch] if arch else {}).items()},
            out / "curves.png",
            title=f"{settings['method']} ({config.get('preset')}), "
                  f"{dataset_label(config['dataset'])}, IPC {config['ipc']}: "
                  f"{arch or 'convnet'} mean ± std over seeds x runs")
    text += "\n" + progress_section(cells, out, config)
    atomic_write_bytes(out / "ablation.md", text.encode("utf-8"))
    series = {arch: ([table[arch][s][0] for s in settings["subsets"]],
                     [table[arch][s][1] for s in settings["subsets"]]) for arch in table}
    plot_bars(settings["subsets"], series or {"none": ([math.nan] * len(settings["subsets"]),
                                                       [0.0] * len(settings["subsets"]))},
              out / "ablation.png", reference="none",
              title=f"{settings['method']} ({config.get('preset')}), "
                    f"{dataset_label(config['dataset'])}, IPC {config['ipc']}: mean ± std "
                    f"(dashed: none)")


# -- curves and progress ----------------------------------------------------------------------
CURVE_COLUMNS = ["subset", "seed", "iteration", "arch", "eval_run", "accuracy", "run_dir"]
"""The columns of ``curves.csv``: one row per evaluation run of every evaluated snapshot."""


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode())


def collect_curves(cells: list[Cell], out: Path) -> list[dict]:
    """The rows of ``curves.csv`` from every cell's evaluated snapshots, unfinished cells too
    (by cell, then iteration, architecture and evaluation run)."""
    rows = []
    for cell in cells:
        for point in read_points(cell.run_dir(out)):
            for arch_result in point.get("per_arch") or [point]:
                for i, accuracy in enumerate(arch_result.get("accuracies", [])):
                    rows.append({"subset": subset_name(list(cell.subset)), "seed": cell.seed,
                                 "iteration": int(point["iteration"]),
                                 "arch": arch_result.get("arch", "convnet"), "eval_run": i,
                                 "accuracy": accuracy,
                                 "run_dir": str(Path("cells") / cell.name)})
    return rows


def summarize_curves(rows: list[dict], subsets: list[str]) -> dict[str, dict[str, list[tuple]]]:
    """arch -> subset -> ``(iteration, mean, population std, n, seeds)`` by iteration, pooled
    over every evaluation run of every seed that has reached that point (``seeds`` says how
    many did, so a partial point is visible)."""
    table: dict[str, dict[str, list[tuple]]] = {}
    for arch in dict.fromkeys(r["arch"] for r in rows):
        table[arch] = {}
        for subset in subsets:
            mine = [r for r in rows if r["arch"] == arch and r["subset"] == subset]
            points = []
            for it in sorted({r["iteration"] for r in mine}):
                values = [r["accuracy"] for r in mine if r["iteration"] == it]
                seeds = len({r["seed"] for r in mine if r["iteration"] == it})
                points.append((it, statistics.fmean(values), statistics.pstdev(values),
                               len(values), seeds))
            table[arch][subset] = points
    return table


NEAR_BEST = 0.5
"""Points of accuracy: the budget T of a study is the first point this close to the best."""


def best_point(points: list[tuple], near: float = NEAR_BEST) -> tuple[tuple | None, tuple | None]:
    """Among :func:`summarize_curves` points reached by the most seeds: the best mean, and the
    first point (lowest iteration) within ``near`` of it; ``(None, None)`` for no points."""
    if not points:
        return None, None
    most = max(p[4] for p in points)
    complete = [p for p in points if p[4] == most]
    best = max(complete, key=lambda p: (p[1], -p[0]))
    return best, next(p for p in complete if p[1] >= best[1] - near)


def curves_markdown(rows: list[dict], subsets: list[str], cells: list[Cell]) -> str:
    """The accuracy-against-iteration tables: per subset pooled over seeds x runs
    (``mean ± std (n)``), then each cell's own mean."""
    lines = ["## Accuracy against iteration", ""]
    if not rows:
        return "\n".join(lines + ["No snapshot evaluated yet.", ""])
    for arch, by_subset in summarize_curves(rows, subsets).items():
        iterations = sorted({p[0] for points in by_subset.values() for p in points})
        lines += [f"{arch}: mean ± population std over every evaluation run of every seed "
                  f"at that point (n: their number).", "",
                  "| iteration | " + " | ".join(subsets) + " |",
                  "|---:|" + "---:|" * len(subsets)]
        for it in iterations:
            row = []
            for subset in subsets:
                hit = [p for p in by_subset[subset] if p[0] == it]
                row.append(f"{hit[0][1]:.2f} ± {hit[0][2]:.2f} ({hit[0][3]})" if hit else "-")
            lines.append(f"| {it} | " + " | ".join(row) + " |")
        lines.append("")
        for subset in subsets:
            best, first = best_point(by_subset[subset])
            if best is not None:
                lines.append(f"- {subset}: best mean {best[1]:.2f} at iteration {best[0]} "
                             f"({best[4]} seeds); the first point within {NEAR_BEST} of it: "
                             f"iteration {first[0]} ({first[1]:.2f}).")
        names = [c.name for c in cells]
        lines += ["", f"{arch}: each cell's mean over its evaluation runs.", "",
                  "| iteration | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
        for it in iterations:
            row = []
            for cell in cells:
                values = [r["accuracy"] for r in rows if r["arch"] == arch
                          and r["iteration"] == it
                          and r["run_dir"] == str(Path("cells") / cell.name)]
                row.append(f"{statistics.fmean(values):.2f}" if values else "-")
            lines.append(f"| {it} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def progress_section(cells: list[Cell], out: Path, config: dict) -> str:
    """``## Progress``: each cell's state, iterations, points and measured costs, and what the
    unfinished cells still need (:mod:`.study_progress`)."""
    progress = [cell_progress(c.name, c.run_dir(out), read_results(c.run_dir(out)) is not None)
                for c in cells]
    started = [p.threads for p in progress if p.iterations is not None]
    rows = remaining(progress, int(config["iterations"]), len(snapshot_points(config)),
                     max(started) if started else 1)
    return "## Progress\n\n" + progress_markdown(rows)
