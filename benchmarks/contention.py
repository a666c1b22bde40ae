"""Timing beside other jobs: busy workers of our own, and the table of wait policies and threads.

:class:`BusyWorkers` starts K single-threaded busy processes (each a Python loop that never
sleeps, holding one core as another user's job would) and stops them. :func:`compare` reruns a
benchmark command under each of :data:`CONDITIONS` (quiet or with K busy workers; the command
lines' own wait-policy choice, OpenMP's default wait, or one thread) in a child process each,
the workers started before the child, and prints one table of seconds per iteration with the
ratios the command lines care about: their default beside busy cores against one thread in the
same conditions, and their default against OpenMP's on a quiet machine.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Sequence

__all__ = ["BusyWorkers", "contend_from_argv", "Condition", "CONDITIONS",
           "compare"]

_SPIN = "while True:\n    pass\n"


class BusyWorkers:
    """``count`` busy single-threaded processes: :meth:`start` them, :meth:`stop` them (also
    as a ``with`` block, which stops them whatever happens inside it)."""

    def __init__(self, count: int):
        self.count, self.workers = max(0, int(count)), []

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self.workers]

    def start(self) -> "BusyWorkers":
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.workers = [subprocess.Popen([sys.executable, "-c", _SPIN], env=env,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
                        for _ in range(self.count)]
        return self

    def stop(self) -> None:
        for w in self.workers:
            w.kill()
        for w in self.workers:
            w.wait()
        self.workers = []

    def __enter__(self) -> list[int]:
        return self.start().pids

    def __exit__(self, *exc) -> None:
        self.stop()


def contend_from_argv(argv: Sequence[str]) -> int:
    """``--contend K``'s K read from a raw command line (0 when absent or not a number): the
    benchmark starts its workers before it imports torch, so that the command lines' wait-policy
    choice sees them as it would see other users' jobs."""
    for i, a in enumerate(argv):
        value = a.split("=", 1)[1] if a.startswith("--contend=") else (
            argv[i + 1] if a == "--contend" and i + 1 < len(argv) else None)
        if value is not None:
            try:
                return max(0, int(value))
            except ValueError:
                return 0
    return 0


@dataclass(frozen=True)
class Condition:
    """One row of :func:`compare`'s table."""

    name: str
    contend: bool            # with the K busy workers
    wait_policy: str | None  # the child's OMP_WAIT_POLICY; "ours": unset, the script chooses;
    #                          None: OpenMP's own default (torch loaded before the script)
    threads: int | None      # --threads, or None for torch's default


CONDITIONS = (
    Condition("quiet, ours", False, "ours", None),
    Condition("quiet, OpenMP default", False, None, None),
    Condition("busy, ours", True, "ours", None),
    Condition("busy, OpenMP default", True, None, None),
    Condition("busy, passive, 1 thread", True, "PASSIVE", 1),
)
"""The command lines' default (``ours``: passive wait only when fewer cores are free than
threads, :func:`baselines.harness.cpu_threads.prefer_passive_wait`), OpenMP's own default wait
(spin about 3 ms, then sleep: what the command lines did before) and one thread, quiet or beside
the busy workers: the rows of the table in docs/benchmarks.md."""

_DEFAULT_WAIT = ("import runpy, sys, torch  # torch first: OpenMP starts before the script "
                 "can set its wait policy\n"
                 "script = sys.argv[1]; sys.argv = sys.argv[1:]\n"
                 "runpy.run_path(script, run_name='__main__')\n")


def child_command(script: str, argv: Sequence[str], cond: Condition, contend: int,
                  out: str) -> tuple[list[str], dict]:
    """The command and environment of one condition's child. For OpenMP's default the child
    imports torch before running ``script`` with ``OMP_WAIT_POLICY`` unset, so the script's own
    passive-wait call comes too late (its output says so: ``too late``)."""
    args = [*argv, "--json", out]  # the workers are the parent's (compare)
    if cond.threads:
        args += ["--threads", str(cond.threads)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if cond.wait_policy is None:
        return [sys.executable, "-c", _DEFAULT_WAIT, script, *args], env
    if cond.wait_policy == "ours":
        return [sys.executable, script, *args], env
    return [sys.executable, script, *args], {**env, "OMP_WAIT_POLICY": cond.wait_policy}


def compare(script: str, argv: Sequence[str], contend: int) -> int:
    """Run ``script argv`` once per condition (beside ``contend`` busy workers started first
    where the condition says, ``--threads`` added, a JSON of its own), then print seconds per iteration by variant and condition and, per variant, the
    two ratios of :func:`table`; the exit code."""
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="contention-") as tmp:
        for i, cond in enumerate(CONDITIONS):
            cmd, env = child_command(script, argv, cond, contend, os.path.join(tmp, f"{i}.json"))
            print(f"== {cond.name}: OMP_WAIT_POLICY={cond.wait_policy or 'OpenMP default'}, "
                  f"{contend if cond.contend else 0} busy worker(s), threads "
                  f"{cond.threads or 'default'}", flush=True)
            with BusyWorkers(contend if cond.contend else 0):  # before the child starts
                code = subprocess.call(cmd, env=env)
            if code:
                return code
            with open(os.path.join(tmp, f"{i}.json")) as f:
                rows = json.load(f)["rows"]
            results[cond.name] = {f"{r['variant']} (IPC {r['ipc']})": r["seconds_median"]
                                  for r in rows}
    print(table(results, contend))
    return 0


def table(results: dict[str, dict[str, float]], contend: int) -> str:
    """The markdown table of :func:`compare`: rows are variants, columns the conditions, then
    ``busy: ours / 1 thread`` (the command lines' default beside busy cores against one thread
    in the same conditions) and ``quiet: ours / OpenMP default`` (what the default costs on a
    quiet machine)."""
    names = [c.name for c in CONDITIONS]
    variants = list(next(iter(results.values())))
    lines = [f"\nseconds per iteration; busy = {contend} single-threaded busy worker(s) beside "
             "the measurement", "",
             "| variant | " + " | ".join(names) + " | busy: ours / 1 thread | "
             "quiet: ours / OpenMP default |",
             "|---|" + "---:|" * (len(names) + 2)]
    for v in variants:
        row = {n: results[n][v] for n in names}
        lines.append(f"| {v} | " + " | ".join(f"{row[n]:.3f}" for n in names)
                     + f" | {row['busy, ours'] / row['busy, passive, 1 thread']:.2f} | "
                     f"{row['quiet, ours'] / row['quiet, OpenMP default']:.2f} |")
    return "\n".join(lines)
