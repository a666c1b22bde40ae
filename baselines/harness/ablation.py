"""The ablation directory of ``baselines/ablate.py``: its cells, their results, its tables.

Contract: a :class:`Cell` is one (plugin subset, seed) of an ablation; under the ablation
directory ``OUT`` it runs in ``OUT/cells/<subset>-s<seed>`` and logs to
``OUT/logs/<subset>-s<seed>.log`` (``<subset>`` is ``none`` or the plugins joined by ``+``,
:func:`subset_name`). :func:`read_results` reads a cell's ``results.json`` back (None while it is
unfinished or unreadable). :func:`write_outputs` writes ``OUT/ablation.csv``, ``ablation.md`` and
``ablation.png`` from the finished cells alone, atomically, naming the unfinished ones; it can be
called at any time, as often as wanted. Nothing here starts a process or handles a signal: the
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

__all__ = ["Cell", "subset_name", "read_results", "collect", "summarize", "markdown",
           "write_outputs"]


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


def write_outputs(out: Path, settings: dict, config: dict, cells: list[Cell]) -> None:
    """``ablation.csv``, ``ablation.md`` and ``ablation.png`` from the finished cells."""
    from baselines.harness.plots import plot_bars
    from dm_plugins.atomic import atomic_write_bytes
    rows = collect(cells, out)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, ["subset", "seed", "arch", "eval_run", "accuracy",
                                     "run_dir"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / "ablation.csv", buffer.getvalue().encode())
    table = summarize(rows, settings["subsets"])
    experts = next((r["expert_test_accuracy"] for c in cells
                    if (r := read_results(c.run_dir(out))) and r.get("expert_test_accuracy")),
                   None)
    text = markdown(settings, config, table, cells, out, experts)
    atomic_write_bytes(out / "ablation.md", text.encode("utf-8"))
    series = {arch: ([table[arch][s][0] for s in settings["subsets"]],
                     [table[arch][s][1] for s in settings["subsets"]]) for arch in table}
    plot_bars(settings["subsets"], series or {"none": ([math.nan] * len(settings["subsets"]),
                                                       [0.0] * len(settings["subsets"]))},
              out / "ablation.png", reference="none",
              title=f"{settings['method']} ({config.get('preset')}), {config['dataset']}, "
                    f"IPC {config['ipc']}: mean ± std (dashed: none)")
