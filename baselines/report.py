#!/usr/bin/env python
"""One report of several runs: an accuracy table and plots.

Usage (from the repo root)::

    python baselines/report.py runs/mini-none runs/mini-ptlm runs/mini-random --out report

Takes distillation run directories (``config.json``, ``results.json``, ``metrics.jsonl``,
``grid.png``) and coreset outputs (``synthetic.pt``, ``grid.png``, and ``evaluation.json`` once
``baselines/evaluate.py`` evaluated them), and writes into ``--out``:

* ``report.md``: one row per run (named by its path relative to the runs' common parent):
  run, method, plugins, preset, ipc, iterations, accuracy
  (mean ± std, final-epoch test accuracy in %, of the first evaluated architecture:
  ``results.json``, else ``evaluation.json``'s convnet or first entry), n (evaluation runs) and
  the experts' test accuracy when the run records it;
* ``curves.png``: every loss part (``metrics.jsonl`` keys starting with ``loss``) and
  ``real_kept`` over iterations, one line per run;
* ``grids.png``: the runs' ``grid.png`` side by side, titled with the run;
* ``accuracy_vs_iteration.png`` and a curve table in ``report.md``, when some run kept
  snapshots (``--eval-at`` / ``--eval-every``): test accuracy against distillation iteration,
  one line per run with a shaded mean ± std band over its evaluation runs (a run still
  distilling shows the points it has);
* with ``--vs KEY``, ``accuracy_vs_<KEY>.png``: accuracy (mean ± std) against a number every
  run records, one line per plugin subset. KEY is a numeric ``config.json`` value
  (``iterations``, ``ipc``, ``expert_epochs``, ...) or ``expert_accuracy`` (the mean test
  accuracy of the run's experts): e.g. where a plugin stops hurting as runs get longer.

The files are rewritten on each call; ``--out`` may not be a run directory. An ``--out`` that
cannot be written (a read-only place, no permission) and a run's ``grid.png`` that cannot be
read (truncated) are refused in one line naming the path, before anything is written; a write
that fails on the way is one line naming the file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from baselines.harness.common import UsageError  # noqa: E402
from baselines.harness.paths import check_writable_dir  # noqa: E402

COLUMNS = ("run", "method", "plugins", "preset", "ipc", "iterations", "accuracy (%)", "n",
           "experts' accuracy (%)")


@dataclass
class RunSummary:
    """What the report shows of one run directory."""

    label: str
    path: Path
    method: str = "-"
    plugins: str = "-"
    preset: str = "-"
    ipc: str = "-"
    iterations: str = "-"
    accuracies: list[float] = field(default_factory=list)
    accuracy_mean: float | None = None
    accuracy_std: float | None = None
    expert_accuracy: list[float] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    curve: list[dict] = field(default_factory=list)

    @property
    def grid(self) -> Path:
        return self.path / "grid.png"

    def row(self) -> list[str]:
        accuracy = ("-" if self.accuracy_mean is None else
                    f"{self.accuracy_mean:.2f} ± {self.accuracy_std or 0.0:.2f}")
        experts = "-"
        if self.expert_accuracy:
            mean = sum(self.expert_accuracy) / len(self.expert_accuracy)
            experts = f"{mean:.2f} ({', '.join(f'{a:.1f}' for a in self.expert_accuracy)})"
        return [self.label, self.method, self.plugins, self.preset, self.ipc, self.iterations,
                accuracy, str(len(self.accuracies)), experts]


def build_parser() -> argparse.ArgumentParser:
    from baselines.harness.driver import DefaultsOnceFormatter
    from baselines.harness.validation import OneLineParser
    p = OneLineParser(prog="baselines/report.py", description=__doc__.split("\n\n")[0],
                      formatter_class=DefaultsOnceFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="distillation run directories or coreset output directories")
    p.add_argument("--out", default="report", help="where report.md, curves.png, grids.png go")
    p.add_argument("--vs", default=None, metavar="KEY",
                   help="also plot accuracy against KEY, one line per plugin subset: a numeric "
                        "config.json value (iterations, ipc, expert_epochs, ...) or "
                        "expert_accuracy")
    return p


def _read_json(path: Path) -> dict:
    from baselines.harness.runs import RunError
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunError(f"{path} is unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise RunError(f"{path} does not hold a JSON object")
    return data


def _is_run(path: Path) -> bool:
    """A run directory, or a re-evaluation file inside one (``RUN/evaluations/*.json``)."""
    if path.is_file() and path.parent.name == "evaluations":
        return _is_run(path.parent.parent)
    return (path / "config.json").is_file() or (path / "synthetic.pt").is_file()


def _plugins(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(value) or "none"
    return "-" if value is None else str(value)


def _numbers(values) -> list[float]:
    return [float(v) for v in values or [] if isinstance(v, (int, float))]


def summarize(path: str | os.PathLike, label: str | None = None) -> RunSummary:
    """Read one run directory (a distillation run or a coreset output), or one of its
    re-evaluations (``RUN/evaluations/evaluation-<n>.json``, written by ``evaluate.py``): the
    run's row with that evaluation's accuracy. A run without ``results.json`` shows its latest
    re-evaluation."""
    from baselines.harness.plots import read_metrics
    from baselines.harness.snapshots import read_curve
    from baselines.harness.synset import load_synset
    path = Path(path)
    evaluation = None
    if path.is_file() and path.parent.name == "evaluations":
        evaluation, path = path, path.parent.parent
    run = RunSummary(label=label or str(path), path=path)
    if (path / "config.json").is_file():
        config = _read_json(path / "config.json")
        run.iterations = str(config.get("iterations", "-"))
        run.preset = str(config.get("preset", config.get("method", "-")))
    else:  # a coreset output: its settings live in the synthetic set's meta
        meta = load_synset(path / "synthetic.pt").meta
        config = {**meta.get("config", {}), "method": meta.get("method"),
                  "plugins": meta.get("plugins"), "ipc": meta.get("ipc")}
    run.config = config
    run.method = str(config.get("method", "-"))
    run.plugins = _plugins(config.get("plugins"))
    run.ipc = str(config.get("ipc", "-"))
    run.expert_accuracy = _numbers(config.get("expert_test_accuracy"))
    result = None
    evaluations = sorted((path / "evaluations").glob("evaluation-*.json"),
                         key=lambda p: int(p.stem.split("-")[-1]))
    if evaluation is not None:  # a re-evaluation named on the command line
        result = _read_json(evaluation)
        run.label = label or f"{path} ({evaluation.stem})"
    elif (path / "results.json").is_file():
        result = _read_json(path / "results.json")
        run.expert_accuracy = _numbers(result.get("expert_test_accuracy")) or run.expert_accuracy
    elif evaluations:
        result = _read_json(evaluations[-1])
    elif (path / "evaluation.json").is_file():
        by_arch = _read_json(path / "evaluation.json").get("results", {})
        if by_arch:
            result = by_arch.get("convnet", next(iter(by_arch.values())))
    if result is not None:
        run.accuracies = _numbers(result.get("accuracies"))
        run.accuracy_mean = result.get("accuracy_mean")
        run.accuracy_std = result.get("accuracy_std")
    run.metrics = read_metrics(path / "metrics.jsonl")
    run.curve = (result or {}).get("curve") if evaluation is None else None
    run.curve = run.curve or read_curve(path)
    return run


def curve_series(runs: list[RunSummary]) -> dict[str, list[tuple[float, float, float]]]:
    """Run label -> ``(iteration, mean, std)`` of its evaluated snapshots (runs with none are
    left out), for :func:`~baselines.harness.plots.plot_accuracy_curves`."""
    return {run.label: [(float(p["iteration"]), float(p["accuracy_mean"]),
                         float(p.get("accuracy_std") or 0.0)) for p in run.curve
                        if isinstance(p.get("accuracy_mean"), (int, float))]
            for run in runs if run.curve}


def curve_table(runs: list[RunSummary]) -> str:
    """A markdown table of the curves: one row per iteration, one column per run."""
    series = curve_series(runs)
    iterations = sorted({int(x) for points in series.values() for x, _, _ in points})
    lines = ["| iteration | " + " | ".join(series) + " |",
             "|---:|" + "---:|" * len(series)]
    for it in iterations:
        row = []
        for points in series.values():
            hit = [f"{m:.2f} ± {s:.2f}" for x, m, s in points if int(x) == it]
            row.append(hit[0] if hit else "-")
        lines.append(f"| {it} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def markdown_table(runs: list[RunSummary]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---" if i < 6 else "---:" for i in range(len(COLUMNS))) + "|"]
    lines += ["| " + " | ".join(run.row()) + " |" for run in runs]
    return "\n".join(lines) + "\n"


def render(runs: list[RunSummary], out: Path) -> list[Path]:
    """Write report.md, curves.png and grids.png (grids only when some run has a grid.png)."""
    from baselines.harness.plots import plot_accuracy_curves, plot_curves, plot_grids
    from dm_plugins.atomic import atomic_write_bytes
    out.mkdir(parents=True, exist_ok=True)
    text = ("# Run report\n\nAccuracy: final-epoch test accuracy (%) of the first evaluated "
            "architecture, mean ± std over n evaluation runs; experts' accuracy: their test "
            "accuracy (%), mean (each).\n\n" + markdown_table(runs))
    written = [out / "report.md", out / "curves.png"]
    series = curve_series(runs)
    if series:
        text += ("\n## Accuracy against iteration\n\nEach run's snapshots: test accuracy (%), "
                 "mean ± std over its evaluation runs.\n\n" + curve_table(runs))
        plot_accuracy_curves(series, out / "accuracy_vs_iteration.png")
        written.append(out / "accuracy_vs_iteration.png")
    atomic_write_bytes(out / "report.md", text.encode("utf-8"))
    plot_curves([(run.label, run.metrics) for run in runs], out / "curves.png")
    grids = [(run.label, run.grid) for run in runs if run.grid.is_file()]
    if grids:
        plot_grids(grids, out / "grids.png")
        written.append(out / "grids.png")
    return written


def vs_value(run: RunSummary, key: str) -> float:
    """The number ``--vs KEY`` plots a run at (a UsageError naming the run when it has none)."""
    from baselines.harness.common import UsageError
    if key == "expert_accuracy":
        if not run.expert_accuracy:
            raise UsageError(f"{run.label} records no expert test accuracy for --vs {key}")
        return sum(run.expert_accuracy) / len(run.expert_accuracy)
    value = run.config.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{run.label} has no numeric {key!r} in its config for --vs {key}")
    return float(value)


def accuracy_vs(runs: list[RunSummary], key: str) -> dict[str, list[tuple[float, float, float]]]:
    """Plugin subset -> ``(x, mean, std)`` of each evaluated run, for :func:`plot_accuracy_vs`.
    Runs without an accuracy are refused (a UsageError)."""
    from baselines.harness.common import UsageError
    series: dict[str, list[tuple[float, float, float]]] = {}
    for run in runs:
        if run.accuracy_mean is None:
            raise UsageError(f"{run.label} has no evaluation to plot against {key}")
        series.setdefault(run.plugins, []).append(
            (vs_value(run, key), float(run.accuracy_mean), float(run.accuracy_std or 0.0)))
    return series


def check_grid(path: Path) -> None:
    """A UsageError naming ``path`` when it is not an image that can be read (truncated, not a
    PNG), before the report draws it into ``grids.png``."""
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds; the file is named
        text = " ".join(str(exc).split())[:200]
        raise UsageError(f"{path} cannot be read as an image ({type(exc).__name__}: {text}); "
                         f"delete it (the report then shows that run without its grid) or "
                         f"write it again") from None


def labels(paths: list[str]) -> list[str]:
    """Short names for the runs: each path relative to the runs' common parent (a lone run:
    its directory name)."""
    full = [os.path.abspath(p) for p in paths]
    if len(full) == 1:
        return [Path(full[0]).name]
    common = os.path.commonpath(full)
    return [os.path.relpath(p, common) if p != common else Path(p).name for p in full]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from baselines.harness.errors import USER_ERRORS
    try:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} is a file; give a directory")
        if _is_run(out):
            raise UsageError(f"--out {out} is a run directory; choose another --out")
        check_writable_dir("--out", out)
        for name in args.runs:
            if not _is_run(Path(name)):
                raise UsageError(f"{name} is not a run directory (no config.json or "
                                 f"synthetic.pt)")
        runs = [summarize(name, label) for name, label in zip(args.runs, labels(args.runs))]
        for run in runs:
            if run.grid.is_file():
                check_grid(run.grid)
        series = accuracy_vs(runs, args.vs) if args.vs else None  # refusals before writing
        try:
            written = render(runs, out)
        except OSError as exc:  # a write that fails on the way (a full disk, permissions)
            raise UsageError(f"--out {out}: cannot write {exc.filename or 'a file'} "
                             f"({exc.strerror or exc})") from None
        if series is not None:
            from baselines.harness.plots import plot_accuracy_vs
            plot_accuracy_vs(series, args.vs, out / f"accuracy_vs_{args.vs}.png")
            written.append(out / f"accuracy_vs_{args.vs}.png")
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown_table(runs), end="")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
