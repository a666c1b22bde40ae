"""Timing beside other jobs: busy workers of our own, and the table of wait policies and threads.

:func:`busy_workers` starts K single-threaded busy processes (each a Python loop that never
sleeps, holding one core as another user's job would) and stops them when the block ends,
whatever happens inside it. :func:`compare` reruns a benchmark command under each of
:data:`CONDITIONS` (quiet or with K busy workers; OpenMP's wait policy passive, the command
lines' default, or active; torch's default threads or one) in a child process each, and prints
one table of seconds per iteration with the ratio the command lines care about: the default
settings beside busy cores against one thread in the same conditions.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Iterator, Sequence

__all__ = ["busy_workers", "Condition", "CONDITIONS", "compare"]

_SPIN = "while True:\n    pass\n"


@contextlib.contextmanager
def busy_workers(count: int) -> Iterator[list[int]]:
    """``count`` busy single-threaded processes for the duration of the block (their pids)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    workers = [subprocess.Popen([sys.executable, "-c", _SPIN], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
               for _ in range(max(0, int(count)))]
    try:
        yield [w.pid for w in workers]
    finally:
        for w in workers:
            w.kill()
        for w in workers:
            w.wait()


@dataclass(frozen=True)
class Condition:
    """One row of :func:`compare`'s table."""

    name: str
    contend: bool        # with the K busy workers
    wait_policy: str     # OMP_WAIT_POLICY of the child: PASSIVE (our default) or ACTIVE
    threads: int | None  # --threads, or None for torch's default


CONDITIONS = (
    Condition("quiet", False, "PASSIVE", None),
    Condition("quiet, active wait", False, "ACTIVE", None),
    Condition("busy", True, "PASSIVE", None),
    Condition("busy, active wait", True, "ACTIVE", None),
    Condition("busy, 1 thread", True, "PASSIVE", 1),
)
"""The default settings (passive wait, torch's threads), OpenMP's spinning wait the command
lines used to get, and one thread, each quiet or beside the busy workers."""


def compare(script: str, argv: Sequence[str], contend: int) -> int:
    """Run ``script argv`` once per condition (``--contend`` and ``--threads`` added, a JSON of
    its own), then print seconds per iteration by variant and condition and, per variant,
    ``busy / busy, 1 thread`` and ``quiet / quiet, active wait``; the exit code."""
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="contention-") as tmp:
        for i, cond in enumerate(CONDITIONS):
            out = os.path.join(tmp, f"{i}.json")
            cmd = [sys.executable, script, *argv, "--json", out,
                   "--contend", str(contend if cond.contend else 0)]
            if cond.threads:
                cmd += ["--threads", str(cond.threads)]
            env = dict(os.environ, OMP_WAIT_POLICY=cond.wait_policy)
            print(f"== {cond.name}: OMP_WAIT_POLICY={cond.wait_policy}, "
                  f"{contend if cond.contend else 0} busy worker(s), threads "
                  f"{cond.threads or 'default'}", flush=True)
            code = subprocess.call(cmd, env=env)
            if code:
                return code
            with open(out) as f:
                rows = json.load(f)["rows"]
            results[cond.name] = {f"{r['variant']} (IPC {r['ipc']})": r["seconds_median"]
                                  for r in rows}
    print(table(results, contend))
    return 0


def table(results: dict[str, dict[str, float]], contend: int) -> str:
    """The markdown table of :func:`compare` (rows: variants; columns: conditions, then the two
    ratios)."""
    names = [c.name for c in CONDITIONS]
    variants = list(next(iter(results.values())))
    lines = [f"\nseconds per iteration; busy = {contend} single-threaded busy worker(s) beside "
             "the measurement", "",
             "| variant | " + " | ".join(names) + " | busy / busy, 1 thread | "
             "quiet / quiet, active wait |",
             "|---|" + "---:|" * (len(names) + 2)]
    for v in variants:
        row = {n: results[n][v] for n in names}
        lines.append(f"| {v} | " + " | ".join(f"{row[n]:.3f}" for n in names)
                     + f" | {row['busy'] / row['busy, 1 thread']:.2f} | "
                     f"{row['quiet'] / row['quiet, active wait']:.2f} |")
    return "\n".join(lines)
