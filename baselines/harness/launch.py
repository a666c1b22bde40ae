"""``--nproc-per-node N``: a command line starts its own N worker processes on this machine, as
``torchrun --nproc-per-node N`` would, and answers with the workers' own exit code and message
(torchrun answers any failure with exit 1 and a ``ChildFailedError`` banner).

Each worker is the same command line without ``--nproc-per-node``, with torchrun's environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` 127.0.0.1 and a
free ``MASTER_PORT``), in its own session: a terminal's Ctrl-C reaches only the launcher, which
passes SIGINT or SIGTERM once to every worker (each finishes its iteration, checkpoints and
exits 130 / 143) and waits for them. Rank 0 prints the run's messages, as under torchrun, and
names this flag, not torchrun, in the command that continues a stopped run (each worker's
``DM_PLUGINS_NPROC_PER_NODE`` says who started it). For several machines, use torchrun
(docs/distributed.md).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

NPROC_ENV = "DM_PLUGINS_NPROC_PER_NODE"
"""Set to N in each worker that ``--nproc-per-node N`` started (torchrun's workers lack it)."""


def strip_flag(argv: list[str], flag: str = "--nproc-per-node") -> list[str]:
    """``argv`` without ``flag N`` / ``flag=N``."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == flag:
            skip = True
            continue
        if a.startswith(flag + "="):
            continue
        out.append(a)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_code(codes: list[int], signum: int | None) -> int:
    """The launcher's answer: a stop by signal wins (130 / 143), then a refusal (2, the first
    worker's message says why), a full disk (3), any other failure (the first nonzero)."""
    if signum is not None:
        return 128 + signum
    for wanted in (2, 3):
        if wanted in codes:
            return wanted
    failed = [c for c in codes if c != 0]
    if not failed:
        return 0
    code = failed[0]
    return 128 - code if code < 0 else code   # a worker killed by signal s: 128 + s


def launch(script: str | Path, argv: list[str], nproc: int) -> int:
    """Run ``nproc`` workers of ``python script argv`` (``argv`` without the flag) and return
    :func:`exit_code` of their exits."""
    port = free_port()
    workers = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(nproc),
               "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(nproc),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), NPROC_ENV: str(nproc)}
        if "OMP_NUM_THREADS" not in os.environ:  # share the cores, as torchrun's default does
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
        workers.append(subprocess.Popen([sys.executable, str(script), *argv], env=env,
                                        start_new_session=True))
    stopped: list[int] = []

    def forward(signum, frame):
        if not stopped:
            stopped.append(signum)
            for worker in workers:
                if worker.poll() is None:
                    worker.send_signal(signum)
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = [worker.wait() for worker in workers]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return exit_code(codes, stopped[0] if stopped else None)
