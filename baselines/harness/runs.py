"""Run directories: what every distillation run writes, and how it resumes.

A run directory holds::

    config.json      every resolved setting, versions, seed
    checkpoint.pt    latest resumable state (atomic), every --checkpoint-every iterations;
                     a run of K > 1 processes (torchrun) writes checkpoint-rank<r>.pt instead,
                     one per rank, each holding that rank's classes, and keeps the previous
                     one as checkpoint-rank<r>.prev.pt
    metrics.jsonl    one JSON object per logged iteration
    run.log          human-readable log
    synthetic.pt     the synthetic set (harness file format, see synset.py)
    grid.png         image grid, one row per class
    curves.png       loss parts and real_kept over iterations (from metrics.jsonl)
    results.json     evaluation: accuracy_mean, accuracy_std, accuracies, arch, protocol;
                     with --eval-at / --eval-every also ``curve``, one point per snapshot
    snapshots/       with --eval-at / --eval-every: iter-<t>.pt, the set after t iterations
                     (synthetic.pt's format), and iter-<t>.json, its evaluation
    .lock            while a process distils or evaluates in it (see dir_lock.py): a second
                     process on the same directory is refused
"""
from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dm_plugins.atomic import atomic_write_bytes

from . import cpu_threads
from .dir_lock import LOCK_NAME, DirectoryInUse, DirectoryLock
from .synset import atomic_torch_save, atomic_write_json, code_version


class RunError(Exception):
    """A run directory cannot be created or resumed (one-line message saying what to do)."""


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since start or the last :func:`reset_peak_memory` (MiB): CUDA max allocated
    on GPU; on CPU the peak resident set size (VmHWM on Linux, else ``ru_maxrss``)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10


def reset_peak_memory(device: torch.device) -> None:
    """Restart peak tracking: CUDA peak stats, or the process's VmHWM through
    /proc/self/clear_refs (Linux; elsewhere the CPU peak cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def environment() -> dict[str, Any]:
    """Versions worth recording next to a result."""
    import numpy
    import pluggy
    import torchvision
    return {"code_version": code_version(), "python": platform.python_version(),
            "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "numpy": numpy.__version__, "pluggy": pluggy.__version__,
            "platform": platform.platform(), **cpu_threads.record(torch.get_num_threads())}


class RunDir:
    """One run's directory. Create with :meth:`create`, reopen with :meth:`open`.

    ``rank`` / ``world_size``: this process's place in a class-sharded run; with
    ``world_size > 1`` the checkpoint is the rank's own ``checkpoint-rank<rank>.pt``.
    """

    def __init__(self, path: str | Path, rank: int = 0, world_size: int = 1):
        self.path = Path(path)
        self.rank, self.world_size = int(rank), int(world_size)
        self._lock = DirectoryLock(self.path, "run directory")

    config_path = property(lambda self: self.path / "config.json")
    checkpoint_path = property(lambda self: self.path / (
        "checkpoint.pt" if self.world_size == 1 else f"checkpoint-rank{self.rank}.pt"))
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    log_path = property(lambda self: self.path / "run.log")
    synset_path = property(lambda self: self.path / "synthetic.pt")
    grid_path = property(lambda self: self.path / "grid.png")
    curves_path = property(lambda self: self.path / "curves.png")
    results_path = property(lambda self: self.path / "results.json")
    snapshots_path = property(lambda self: self.path / "snapshots")

    def snapshot_set_path(self, iteration: int) -> Path:
        """The set kept after ``iteration`` iterations (``--eval-at``)."""
        return self.snapshots_path / f"iter-{int(iteration):06d}.pt"

    def snapshot_result_path(self, iteration: int) -> Path:
        """The evaluation of :meth:`snapshot_set_path` (written once it is complete)."""
        return self.snapshots_path / f"iter-{int(iteration):06d}.json"

    @classmethod
    def create(cls, path: str | Path, config: dict, rank: int = 0,
               world_size: int = 1) -> "RunDir":
        """A new run in ``path``, its config written and its lock held (:meth:`release`)."""
        from .folders import missing_ancestors
        run = cls(path, rank, world_size)
        run._created = missing_ancestors(run.path)  # removed again if the run never starts
        run.path.mkdir(parents=True, exist_ok=True)
        run.acquire()  # before the check, so two new runs racing for one --out see each other
        if run.config_path.exists():
            run.release()
            raise RunError(f"run directory {run.path} already holds a run; pass --resume "
                           f"{run.path} to continue it, or choose another --out")
        atomic_write_json(run.config_path, config)
        return run

    def acquire(self) -> None:
        """Hold the directory's lock until :meth:`release`; a RunError when another live
        process holds it (one rank of a sharded run takes it for all)."""
        try:
            self._lock.acquire()
        except DirectoryInUse as exc:
            raise RunError(str(exc)) from None

    def release(self) -> None:
        """Give the lock back (nothing when it is not held)."""
        self._lock.release()

    @classmethod
    def open(cls, path: str | Path, rank: int = 0, world_size: int = 1,
             clean: bool = True) -> "RunDir":
        """Reopen a run for ``--resume``; temp files left by a killed atomic write are removed
        (when ``clean``: one process of a sharded run does it)."""
        run = cls(path, rank, world_size)
        if not run.config_path.is_file():
            raise RunError(f"{run.path} is not a run directory (no config.json); pass the --out "
                           f"directory of an earlier run")
        for stale in run.path.glob(".*.tmp") if clean else ():
            stale.unlink(missing_ok=True)
        return run

    _UNSTARTED = {"config.json", "run.log", "metrics.jsonl", LOCK_NAME}

    def remove_unstarted(self) -> None:
        """Delete a run directory that failed before its first iteration (it holds only
        config.json, run.log and temp files), and the parent folders :meth:`create` made for
        it when they are empty again (a default ``runs/``); anything else leaves it in place."""
        from .folders import remove_if_empty
        names = {p.name for p in self.path.iterdir()}
        if all(n in self._UNSTARTED or (n.startswith(".") and n.endswith(".tmp")) for n in names):
            self.release()
            shutil.rmtree(self.path, ignore_errors=True)
            remove_if_empty(getattr(self, "_created", [])[1:])

    def read_config(self) -> dict:
        try:
            return json.loads(self.config_path.read_text())
        except (OSError, ValueError) as exc:
            raise RunError(f"{self.config_path} is unreadable ({exc}); start a new run") from None

    def log(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.log_path, "a") as f:
            f.write(f"{stamp} {message}\n")

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, before_iteration: int) -> None:
        """Drop records of iterations >= ``before_iteration`` (they are redone after resume)."""
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line torn by a kill mid-write: dropped, redone on resume
                continue
            if isinstance(record, dict) and record.get("iteration", -1) < before_iteration:
                kept.append(line)
        atomic_write_bytes(self.metrics_path, "".join(line + "\n" for line in kept).encode())

    previous_checkpoint_path = property(
        lambda self: self.path / f"checkpoint-rank{self.rank}.prev.pt")

    def save_checkpoint(self, state: dict) -> None:
        """Write ``state`` atomically. A process of a run of several keeps its previous
        checkpoint too (``checkpoint-rank<r>.prev.pt``): a kill between two processes' writes
        then still leaves an iteration every process has (see :meth:`load_checkpoints`)."""
        if self.world_size > 1 and self.checkpoint_path.exists():
            os.replace(self.checkpoint_path, self.previous_checkpoint_path)
        atomic_torch_save(self.checkpoint_path, state)

    def load_checkpoint(self) -> dict | None:
        """The saved state, None when the run has no checkpoint yet."""
        return self._load(self.checkpoint_path)

    def load_checkpoints(self) -> dict[int, dict]:
        """This process's saved states by the iteration they resume at: the latest and, in a
        run of several processes, the previous one (empty when there is none)."""
        paths = [self.checkpoint_path] + ([self.previous_checkpoint_path]
                                          if self.world_size > 1 else [])
        states = [self._load(path) for path in paths]
        return {int(state["iteration"]): state for state in states if state is not None}

    def _load(self, path: Path) -> dict | None:
        if not path.exists():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
            raise RunError(f"checkpoint {path} is unreadable (truncated or "
                           f"corrupt? {type(exc).__name__}); delete it to restart the run from "
                           f"the beginning") from None
        if not isinstance(state, dict) or "host" not in state:
            raise RunError(f"checkpoint {path} is not a dm_plugins checkpoint; "
                           f"delete it to restart the run")
        return state

    def write_results(self, results: dict) -> None:
        atomic_write_json(self.results_path, results)


class RunLog:
    """Prints each message and appends it to ``run.log``; with ``hold``, the appends wait until
    :meth:`release` (messages of a resume that is then refused never reach the run's log)."""

    def __init__(self, run_dir: RunDir, hold: bool = False):
        self.run_dir, self.held = run_dir, [] if hold else None

    def __call__(self, message: str) -> None:
        print(message, flush=True)
        if self.held is not None:
            self.held.append(message)
        else:
            self.run_dir.log(message)

    def release(self) -> None:
        held, self.held = self.held, None
        for message in held or ():
            self.run_dir.log(message)


class _Silent:
    """The log of a rank other than 0: it writes nothing."""

    def __call__(self, message: str) -> None:
        pass

    def release(self) -> None:
        pass


silent = _Silent()
