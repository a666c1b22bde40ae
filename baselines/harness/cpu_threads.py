"""CPU threads of a command: how idle OpenMP threads wait, and how many threads torch uses.

PyTorch's CPU kernels run in OpenMP parallel regions. Between regions an idle worker thread
spins for a while (about 3 ms, OpenMP's default) before it sleeps. When another job holds one
of the cores, each of our many short regions (chunks of 32 images) then waits for a thread
that is not running: on the 2-core machine of docs/benchmarks.md the DM host ran 1.9x slower
than one thread in the same conditions. With passive wait an idle thread sleeps at once, and a
2-thread run beside a busy core is as fast as a 1-thread one; but on a quiet machine passive
wait made the same host 27-34 % slower (each region then waits for threads to wake up).

So every command line that computes calls :func:`prefer_passive_wait` before torch is imported
(OpenMP reads ``OMP_WAIT_POLICY`` once, when torch loads it). Unless the user set a policy, it
counts the other tasks running now (``/proc/loadavg``'s runnable count, the median of a few
readings over 0.1 s): when fewer cores are free than threads will run, it sets
``OMP_WAIT_POLICY=PASSIVE``; on a quiet machine it leaves OpenMP's default. The wait policy does
not change any result (only how threads wait), so runs stay bit-identical either way. The choice
holds for the whole process: a run started quiet keeps spinning if a job starts beside it later.
``--threads N`` (:func:`apply_threads`) sets torch's thread count, otherwise torch's own choice
(the machine's physical cores, or ``OMP_NUM_THREADS``). :func:`describe` is the run's log line;
:func:`record` what config.json's ``environment`` keeps (not a setting: ``--resume`` does not
compare it).

This module imports only the standard library, so that it can run before torch.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import MutableMapping

__all__ = ["WAIT_POLICY", "prefer_passive_wait", "other_running_tasks", "wait_policy",
           "apply_threads", "describe", "record", "positive_threads"]

WAIT_POLICY = "OMP_WAIT_POLICY"

_state = {"set_by_us": False, "too_late": False, "why": ""}


def other_running_tasks(readings: int = 5, interval: float = 0.02) -> int | None:
    """How many tasks besides this process are running or runnable now: the median of
    ``readings`` of ``/proc/loadavg``'s runnable count (which counts this process too),
    ``interval`` seconds apart; None where there is no ``/proc/loadavg``."""
    counts = []
    for i in range(readings):
        try:
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            return None
        if i + 1 < readings:
            time.sleep(interval)
    return max(0, statistics.median_low(counts))


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def prefer_passive_wait(environ: MutableMapping[str, str] | None = None,
                        others: int | None = -1, cores: int | None = None) -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` in ``environ`` (default ``os.environ``) when the user set
    no policy and fewer cores are free than threads will run (``OMP_NUM_THREADS``, else every
    core of this process's affinity mask); True when this call set it. ``others``: the other
    running tasks (default: :func:`other_running_tasks`); ``cores``: default the affinity
    mask's. Called after torch was imported, it still sets the variable (child processes
    inherit it) but this process keeps torch's policy: recorded as ``too late``."""
    environ = os.environ if environ is None else environ
    if environ.get(WAIT_POLICY, "").strip():
        return False
    cores = _cores() if cores is None else int(cores)
    try:
        threads = int(environ.get("OMP_NUM_THREADS", "") or cores)
    except ValueError:
        threads = cores
    others = other_running_tasks() if others == -1 else others
    free = None if others is None else max(0, cores - others)
    if threads <= 1 or free is None or free >= threads:
        if environ is os.environ:
            _state["why"] = (f"{others} other running task(s) on {cores} core(s)"
                             if others is not None else "no load reading")
        return False
    environ[WAIT_POLICY] = "PASSIVE"
    if environ is os.environ:
        _state.update(set_by_us=True, too_late="torch" in sys.modules,
                      why=f"{others} other running task(s) on {cores} core(s)")
    return True


def wait_policy(environ: MutableMapping[str, str] | None = None) -> tuple[str, str]:
    """``(policy, who chose it)``: ``("passive", "ours: 1 other running task(s) on 2
    core(s)")``, ``("OpenMP's default", "ours: 0 other running task(s) on 2 core(s)")``,
    ``("active", "OMP_WAIT_POLICY")``, or ``("OpenMP's default", "too late: ...")`` when
    :func:`prefer_passive_wait` set it after torch had loaded OpenMP."""
    environ = os.environ if environ is None else environ
    if _state["set_by_us"] and _state["too_late"]:
        return "OpenMP's default", "too late: torch was imported first"
    value = environ.get(WAIT_POLICY, "").strip()
    ours = f"ours: {_state['why']}" if _state["why"] else "unset"
    if not value:
        return "OpenMP's default", ours
    if _state["set_by_us"] and value == "PASSIVE":
        return "passive", ours
    return value.lower(), WAIT_POLICY


def positive_threads(text: str) -> int:
    """``--threads``'s argparse type: a whole number >= 1 (otherwise one argparse error line)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a thread count (a whole number >= 1): {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a thread count (a whole number >= 1): {text!r}")
    return value


def apply_threads(threads: int | None) -> int:
    """Use ``threads`` torch threads when given (``--threads``); the count now in use."""
    import torch  # imported here: this module must stay importable before torch
    if threads:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def describe(threads: int, given: bool) -> str:
    """The log line's part: ``threads 2 (torch's default), OpenMP wait passive (ours)``."""
    policy, who = wait_policy()
    source = "--threads" if given else ("OMP_NUM_THREADS" if os.environ.get("OMP_NUM_THREADS")
                                        else "torch's default")
    return f"threads {threads} ({source}), OpenMP wait {policy} ({who})"


def record(threads: int) -> dict:
    """What config.json's ``environment`` records: the thread count and the wait policy."""
    policy, who = wait_policy()
    return {"threads": int(threads), "omp_wait_policy": policy, "omp_wait_policy_source": who}
