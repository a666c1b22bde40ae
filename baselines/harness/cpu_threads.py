"""CPU threads of a command: how idle OpenMP threads wait, and how many threads torch uses.

PyTorch's CPU kernels run in OpenMP parallel regions. Between regions an idle worker thread
spins for a while before it sleeps (OpenMP's active wait). When another job holds one of the
cores, each of our many short regions (chunks of 32 images) then waits for a thread that is not
running, and a 2-thread run gets slower than a 1-thread one: 2.8x slower than quiet against
1.9x for the original DM code on the 2-core machine of docs/benchmarks.md. With passive wait an
idle thread sleeps at once; a 2-thread run beside a busy core is then as fast as a 1-thread
one, and a quiet run loses nothing measurable.

So every command line that computes calls :func:`prefer_passive_wait` before torch is imported
(libgomp reads ``OMP_WAIT_POLICY`` once, when torch loads it): it sets ``OMP_WAIT_POLICY=PASSIVE``
unless the user set a policy. ``--threads N`` (:func:`apply_threads`) overrides torch's thread
count, which is otherwise torch's own choice (the machine's physical cores, or
``OMP_NUM_THREADS``). :func:`describe` is the run's log line; :func:`record` what config.json's
``environment`` keeps (not a setting: ``--resume`` does not compare it).

This module imports only the standard library at the top, so that it can run before torch.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import MutableMapping

__all__ = ["WAIT_POLICY", "prefer_passive_wait", "wait_policy", "apply_threads", "describe",
           "record", "positive_threads"]

WAIT_POLICY = "OMP_WAIT_POLICY"

_state = {"set_by_us": False, "too_late": False}


def prefer_passive_wait(environ: MutableMapping[str, str] | None = None) -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` in ``environ`` (default ``os.environ``) unless it holds a
    policy already; True when this call set it. Called after torch was imported, it still sets
    the variable (child processes inherit it) but this process keeps torch's policy: recorded as
    ``too late`` by :func:`wait_policy`."""
    environ = os.environ if environ is None else environ
    if environ.get(WAIT_POLICY, "").strip():
        return False
    environ[WAIT_POLICY] = "PASSIVE"
    if environ is os.environ:
        _state["set_by_us"] = True
        _state["too_late"] = "torch" in sys.modules
    return True


def wait_policy(environ: MutableMapping[str, str] | None = None) -> tuple[str, str]:
    """``(policy, who chose it)``: ``("passive", "ours")``, ``("active", "OMP_WAIT_POLICY")``,
    ``("OpenMP's default", "unset")`` or, when :func:`prefer_passive_wait` ran after torch had
    loaded OpenMP, ``("OpenMP's default", "too late: torch was imported first")``."""
    environ = os.environ if environ is None else environ
    if _state["set_by_us"] and _state["too_late"]:
        return "OpenMP's default", "too late: torch was imported first"
    value = environ.get(WAIT_POLICY, "").strip()
    if not value:
        return "OpenMP's default", "unset"
    who = "ours" if _state["set_by_us"] and value == "PASSIVE" else WAIT_POLICY
    return value.lower(), who


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
