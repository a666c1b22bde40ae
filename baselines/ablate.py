#!/usr/bin/env python
"""Plugin ablation: every subset of the plugins x seeds, one method, one preset, one expert pool.

Usage (from the repo root)::

    python baselines/ablate.py --method dm --plugins cap,ptm,plm --seeds 0,1,2 --out runs/abl \\
        --preset ptlm --dataset imagefolder:data/cifar10-mini --iterations 300 --eval-runs 3
    python baselines/ablate.py --method dm --subsets "none;cap;cap,ptm" --seeds 0 --out runs/a2

Cells are ``(plugin subset, seed)``: every subset of ``--plugins`` (none first, then the single
plugins, the pairs, ..., all of them; within a size in ``--plugins`` order), or the
``;``-separated ``--subsets``, times ``--seeds``. Each cell is one run of
``baselines/<method>.py`` (a subprocess) in ``OUT/cells/<subset>-s<seed>`` (``<subset>`` is
``none`` or the plugins joined by ``+``), its output in ``OUT/logs/<subset>-s<seed>.log``. Every
other flag (``--preset``, ``--dataset``, ``--iterations``, ...) goes to every cell unchanged.
All cells share one expert pool: ``--expert-seed`` (default: the first seed) is passed to each.

A rerun of the same command resumes: a cell with ``results.json`` is read back, a cell with a
run directory but no results continues with ``--resume``, the others start. ``OUT/ablation.json``
records the settings; another command on the same ``OUT`` is refused (one that only adds seeds
or subsets grows the ablation by those cells), and so is a second runner while one is running
there (``OUT/.lock``). ``--jobs N`` runs N cells
at once (each with ``OMP_NUM_THREADS`` = cores // N unless set); when the expert pool is not
in the cache yet, the first cell that needs experts runs alone, so the pool is trained once.

Writes ``OUT/ablation.csv`` (one row per evaluation run of every cell: subset, seed, arch,
eval_run, accuracy, run_dir), ``OUT/ablation.md`` (one row per subset: final-epoch test accuracy
in %, mean ± population std over all evaluation runs of all seeds, and n, their number) and
``OUT/ablation.png`` (the same as bars with ± std error bars). Exit 0 when every cell finished,
1 when some failed (their logs are named), 2 for bad input (before any work). The three files
are rewritten after every finished cell (and on Ctrl-C), with the unfinished cells named, so a
long ablation can be read while it runs. Cells with snapshots (``--eval-every``) add
``OUT/curves.csv`` and ``OUT/curves.png``, partial cells included; ``ablation.md`` ends with each
cell's progress and the CPU-hours left. ``--status OUT`` rewrites the tables and prints those
sections without starting anything.

Stopping: Ctrl-C or SIGTERM to the runner (only to it: each cell runs in its own session, out of
the terminal's reach) starts no further cell and passes the signal once to each running cell,
which stops at the end of its iteration and keeps its checkpoint; the runner waits for them,
rewrites the tables and exits 128 + the signal number (130, 143).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# the cells' names, paths and results, and the tables: importable from here as before
from baselines.harness.common import UsageError  # noqa: E402
from baselines.harness.ablation import (Cell, collect, markdown, read_results,  # noqa: E402,F401
                                        subset_name, summarize, write_outputs)

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("dm", "idm", "dance")
FORMAT = "dm_plugins.ablation"
OWNED = {"plugins": "--plugins/--subsets", "seed": "--seeds", "out": "--out",
         "resume": "a rerun of the same command (it resumes)"}
"""Method flags the runner sets itself (argparse dest -> what to use instead)."""
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def build_parser() -> argparse.ArgumentParser:
    from baselines.harness.driver import DefaultsOnceFormatter
    from baselines.harness.validation import OneLineParser
    p = OneLineParser(prog="baselines/ablate.py", description=__doc__.split("\n\n")[0],
                      formatter_class=DefaultsOnceFormatter,
                      allow_abbrev=False,
                      epilog="Any other flag is passed to baselines/<method>.py for every cell.")
    p.add_argument("--method", choices=METHODS, help="the distillation method (required)")
    p.add_argument("--plugins", default="cap,ptm,plm",
                   help="plugins whose every subset is a row")
    p.add_argument("--subsets", default=None,
                   help="';'-separated plugin subsets instead of all of them, e.g. "
                        "\"none;cap;cap,ptm\"")
    p.add_argument("--seeds", default="0", help="comma list of run seeds")
    p.add_argument("--out", help="the ablation directory (required)")
    p.add_argument("--jobs", type=int, default=1, help="cells run at once")
    p.add_argument("--status", metavar="OUT", default=None,
                   help="print how far the ablation in OUT is (cells, curves, what remains, "
                        "in CPU-hours) and rewrite its tables; starts nothing")
    return p


# -- cells ------------------------------------------------------------------------------------
def expand_subsets(plugins: list[str]) -> list[list[str]]:
    """Every subset of ``plugins``: the empty one, then by size, within a size in
    ``itertools.combinations`` order of ``plugins``."""
    return [list(c) for r in range(len(plugins) + 1) for c in itertools.combinations(plugins, r)]


def parse_subsets(text: str) -> list[list[str]]:
    """``"none;cap;cap,ptm"`` -> ``[[], ["cap"], ["cap", "ptm"]]`` (names checked; an empty
    entry or a subset listed twice is a UsageError)."""
    from dm_plugins import check_plugin_names
    subsets, seen = [], set()
    for entry in text.split(";"):
        if not entry.strip():
            raise UsageError(f"--subsets {text!r} has an empty entry; write 'none' for no "
                             f"plugins")
        subset = check_plugin_names(entry)
        if frozenset(subset) in seen:
            raise UsageError(f"--subsets lists {subset_name(subset)} twice")
        seen.add(frozenset(subset))
        subsets.append(subset)
    return subsets


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds {text!r}: give a comma list of integers") from None
    if not seeds:
        raise UsageError("--seeds names no seed; give e.g. 0,1,2")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds {text!r} lists a seed twice")
    return seeds


def new_cell_argv(cell: Cell, out: Path, extra: list[str]) -> list[str]:
    """The method command line that starts ``cell``: the shared flags, its plugins, seed and
    run directory."""
    return [*extra, "--plugins", ",".join(cell.subset) or "none", "--seed", str(cell.seed),
            "--out", str(cell.run_dir(out)), "--no-progress"]


def cell_argv(cell: Cell, out: Path, extra: list[str]) -> list[str]:
    """The method command line of ``cell``: ``--resume`` when its run directory holds a run,
    else :func:`new_cell_argv`."""
    run_dir = cell.run_dir(out)
    if (run_dir / "config.json").is_file():
        return ["--resume", str(run_dir), "--no-progress"]
    return new_cell_argv(cell, out, extra)


class RunningCells:
    """The cell subprocesses alive now, so that a signal to the runner reaches each of them
    once. Each cell gets its own session: a terminal's Ctrl-C reaches the runner only, and the
    runner passes it on (a second signal would make a cell drop its current iteration)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen] = set()
        self.stopping: int | None = None   # the signal being passed on; no new cell starts

    def run(self, command: list[str], log, env: dict) -> int:
        with self._lock:
            if self.stopping is not None:
                return 128 + self.stopping
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
            self._procs.add(proc)
        try:
            return proc.wait()
        finally:
            with self._lock:
                self._procs.discard(proc)

    def reset(self) -> None:
        with self._lock:
            self.stopping = None

    def stop(self, signum: int) -> None:
        """Start no further cell and send ``signum`` to each running one."""
        with self._lock:
            self.stopping = signum
            for proc in self._procs:
                proc.send_signal(signum)


CELLS = RunningCells()


def run_cell(method: str, argv: list[str], log_path: Path, env: dict) -> int:
    """Run ``baselines/<method>.py argv`` in a subprocess, its output appended to ``log_path``;
    the exit code (128 + the signal when the runner is stopping and the cell did not start)."""
    command = [sys.executable, str(ROOT / "baselines" / f"{method}.py"), *argv]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
        log.flush()
        return CELLS.run(command, log, env)


def cell_env(jobs: int) -> dict:
    """The environment of a cell: ours, with the thread counts set to cores // jobs unless
    already set."""
    env = dict(os.environ)
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    for var in _THREAD_VARS:
        env.setdefault(var, threads)
    return env


# -- settings and the ablation directory ------------------------------------------------------
GROWABLE = ("seeds", "subsets")
"""Settings a rerun may extend: the recorded seeds and subsets stay, new ones are added."""


def grows(recorded: dict, settings: dict) -> bool:
    """Whether ``settings`` equal ``recorded`` but for more seeds or subsets (every recorded
    one kept), so the ablation directory can grow by cells."""
    others = (set(recorded) | set(settings)) - set(GROWABLE)
    return (all(recorded.get(k) == settings.get(k) for k in others)
            and all(isinstance(recorded.get(k), list) and set(recorded[k]) <= set(settings[k])
                    for k in GROWABLE))


def check_out(out: Path, settings: dict) -> None:
    """``out`` is new, empty, or an ablation directory of the same settings, or of settings
    that :func:`grows` into these (more seeds or subsets, everything else the same)."""
    from baselines.harness.dir_lock import LOCK_NAME
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a directory")
    record = out / "ablation.json"
    if record.is_file():
        try:
            recorded = json.loads(record.read_text()).get("settings")
        except (OSError, ValueError, AttributeError):
            raise UsageError(f"{record} is unreadable; choose another --out") from None
        if recorded != settings and not grows(recorded or {}, settings):
            diff = sorted(k for k in set(settings) | set(recorded or {})
                          if (recorded or {}).get(k) != settings.get(k))
            raise UsageError(f"--out {out} holds an ablation with other settings "
                             f"({', '.join(diff)} differ); rerun it with its own command "
                             f"(see {record}; more --seeds or --subsets may be added), or "
                             f"choose another --out")
    elif out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()):  # a runner starting
        raise UsageError(f"--out {out} exists and is not an ablation directory; choose a new "
                         f"or empty --out")


def validate(args: argparse.Namespace, extra: list[str]) -> tuple[list[Cell], dict, dict]:
    """Every check, before any work: the cells, the settings (what ``ablation.json`` records
    and compares) and the resolved config of the first cell (for the report's header)."""
    from baselines.harness import driver
    from dm_plugins import check_plugin_names

    if args.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    if args.subsets is not None:
        subsets = parse_subsets(args.subsets)
    else:
        plugins = check_plugin_names(args.plugins)
        subsets = expand_subsets(plugins)
    seeds = parse_seeds(args.seeds)
    spec = _spec(args.method)
    _, explicit = driver.parse_args(spec, extra)
    for dest, instead in OWNED.items():
        if dest in explicit:
            raise UsageError(f"--{dest.replace('_', '-')} is set by the ablation runner for "
                             f"each cell; use {instead}")
    if "expert_seed" not in explicit:
        extra = [*extra, "--expert-seed", str(seeds[0])]
    out = Path(args.out)
    cells = [Cell(tuple(s), seed) for s in subsets for seed in seeds]
    _, config = driver.new_run_config(spec, *driver.parse_args(
        spec, new_cell_argv(cells[0], out, extra)))
    if config["eval_runs"] < 1:
        raise UsageError("--eval-runs must be >= 1 in an ablation (its table is the "
                         "evaluation)")
    settings = {"method": args.method, "subsets": [subset_name(s) for s in subsets],
                "seeds": seeds, "args": extra}
    check_out(out, settings)
    return cells, settings, config


def _spec(method: str):
    import importlib
    return importlib.import_module(f"baselines.{method}").SPEC


# -- running ----------------------------------------------------------------------------------
def run_cells(method: str, cells: list[Cell], out: Path, extra: list[str], jobs: int,
              needs_experts, on_finished=lambda: None, stop=None) -> list[Cell]:
    """Run the unfinished ``cells`` (``jobs`` at a time; with jobs > 1 the first cell that
    ``needs_experts`` runs alone first); the cells that failed. ``on_finished()`` is called
    (one call at a time) after each cell that finished, so the tables can be refreshed while
    the other cells run. On ``KeyboardInterrupt`` (SIGTERM too, under ``stop.installed()``, a
    :class:`~baselines.harness.guards.StopRequest` that records the signal) each running cell
    gets the signal once and no other starts; it returns when they have exited, re-raising."""
    pending = [c for c in cells if read_results(c.run_dir(out)) is None]
    done = len(cells) - len(pending)
    if done:
        print(f"{done} of {len(cells)} cells already finished (read back)", flush=True)
    failed: list[Cell] = []
    lock = threading.Lock()
    env = cell_env(jobs)
    CELLS.reset()
    counter = itertools.count(done + 1)

    def one(cell: Cell) -> None:
        if CELLS.stopping is not None:
            return
        argv = cell_argv(cell, out, extra)
        how = "resume" if argv[0] == "--resume" else "start"
        with lock:
            print(f"[{next(counter)}/{len(cells)}] {how} {cell.name}", flush=True)
        started = time.perf_counter()
        code = run_cell(method, argv, cell.log_path(out), env)
        results = read_results(cell.run_dir(out))
        seconds = time.perf_counter() - started
        with lock:
            if code == 0 and results is not None:
                print(f"finished {cell.name} in {seconds:.0f} s: "
                      f"{results.get('accuracy_mean', math.nan):.2f} ± "
                      f"{results.get('accuracy_std', math.nan):.2f}", flush=True)
                on_finished()
            elif CELLS.stopping is not None:
                print(f"stopped {cell.name} (exit {code}); rerun to resume it", flush=True)
            else:
                failed.append(cell)
                print(f"failed {cell.name} (exit {code}); see {cell.log_path(out)}", flush=True)

    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        if jobs > 1:
            first = next((c for c in pending if needs_experts(c)), None)
            if first is not None:
                pending.remove(first)
                pool.submit(one, first).result()
        list(pool.map(one, pending))
    except KeyboardInterrupt:
        CELLS.stop(int(getattr(stop, "signum", None) or signal.SIGINT))
        pool.shutdown(wait=True, cancel_futures=True)   # the running cells checkpoint and exit
        raise
    pool.shutdown(wait=True)
    return failed


def recorded_command(out: Path) -> tuple[argparse.Namespace, list[str]]:
    """The runner's arguments and the method flags of the ablation recorded in
    ``out/ablation.json`` (for ``--status``)."""
    try:
        settings = json.loads((out / "ablation.json").read_text())["settings"]
        args = argparse.Namespace(
            method=settings["method"], plugins=None, out=str(out), jobs=1, status=None,
            subsets=";".join(s.replace("+", ",") for s in settings["subsets"]),
            seeds=",".join(str(s) for s in settings["seeds"]))
        return args, list(settings["args"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UsageError(f"--status {out}: no readable ablation.json there; give the --out "
                         f"of an ablation") from None


def status(args: argparse.Namespace, extra: list[str]) -> int:
    """``--status OUT``: rewrite OUT's tables from what its cells hold now and print the
    curves and the progress sections of ``ablation.md``."""
    from baselines.harness.errors import USER_ERRORS
    out = Path(args.status)
    try:
        if extra or args.method or args.out:
            raise UsageError("--status OUT takes no other flag; the ablation's own are read "
                             "from OUT/ablation.json")
        args, extra = recorded_command(out)
        cells, settings, config = validate(args, extra)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_outputs(out, settings, config, cells)
    text = (out / "ablation.md").read_text()
    start = text.find("## Accuracy against iteration")
    print(text[start if start >= 0 else text.find("## Progress"):], end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    from baselines.harness.dir_lock import DirectoryInUse, DirectoryLock
    from baselines.harness.errors import USER_ERRORS
    from dm_plugins.atomic import atomic_write_json
    if args.status is not None:
        return status(args, extra)
    if args.method is None or args.out is None:
        print("error: give --method and --out (or --status OUT to look at an ablation)",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        try:
            cells, settings, config = validate(args, extra)
        except SystemExit as exc:  # the method's parser refused a flag (one line printed)
            return int(exc.code or 0)
        out.mkdir(parents=True, exist_ok=True)
        lock = DirectoryLock(out, "ablation directory").acquire()  # one runner per directory
        atomic_write_json(out / "ablation.json", {
            "format": FORMAT, "version": 1, "settings": settings,
            "command": ["baselines/ablate.py", *(argv if argv is not None else sys.argv[1:])]})
    except USER_ERRORS + (DirectoryInUse,) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return _run(args, out, cells, settings, config)
    finally:
        lock.release()


def _run(args: argparse.Namespace, out: Path, cells: list[Cell], settings: dict,
         config: dict) -> int:
    from dm_plugins import plugins_need_experts
    from baselines.harness.guards import StopRequest
    spec = _spec(args.method)
    from baselines.harness.expert_cache import cached_expert_count, experts_directory
    # a cell that would train experts runs alone first, so the pool is trained once; a pool
    # already in the cache is only loaded, and then every cell can start at once
    pool_ready = cached_expert_count(experts_directory(config)) >= config["num_experts"]
    needs = lambda cell: not pool_ready and (  # noqa: E731
        spec.needs_experts or plugins_need_experts(list(cell.subset)))
    print(f"ablation of {args.method}: {len(settings['subsets'])} subsets x "
          f"{len(settings['seeds'])} seeds = {len(cells)} cells in {out / 'cells'}", flush=True)
    # the tables are rewritten after every finished cell: a long ablation (or one finished over
    # several sessions) can be read, with its unfinished cells named, before it ends
    refresh = lambda: write_outputs(out, settings, config, cells)  # noqa: E731
    stop = StopRequest()   # outside a run's loop it turns SIGTERM, like SIGINT, into
    try:                   # KeyboardInterrupt, and records which signal came
        with stop.installed():
            failed = run_cells(args.method, cells, out, settings["args"], args.jobs, needs,
                               on_finished=refresh, stop=stop)
    except KeyboardInterrupt:
        refresh()
        signum = int(stop.signum or signal.SIGINT)
        print(f"interrupted ({signal.Signals(signum).name}); rerun the same command to resume "
              f"({out} keeps finished cells and the checkpoints of stopped ones; "
              f"{out / 'ablation.md'} has the finished ones)", file=sys.stderr)
        return 128 + signum
    write_outputs(out, settings, config, cells)
    print(f"wrote {out / 'ablation.csv'}, {out / 'ablation.md'}, {out / 'ablation.png'}")
    if failed:
        print(f"{len(failed)} of {len(cells)} cells failed: "
              f"{', '.join(c.name for c in failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
