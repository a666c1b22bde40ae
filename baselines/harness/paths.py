"""Checks on the places a run will write to, made before any work starts, and tidying of the
folders a failed attempt created.

Every check raises :class:`~baselines.harness.common.UsageError` with one line naming the flag,
the path and what to do (the command lines print it as ``error: ...`` and exit 2).
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from .common import UsageError

#: a run directory's own names that may be present in a directory we are asked to create a run
#: in (a stale lock, temp files of a killed write); anything else makes it someone else's folder
_OURS = (".lock",)


def first_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(flag: str, path: str | os.PathLike) -> None:
    """``path`` can be a directory this process writes into: it is one already, or it can be
    created (no file in the way, and the nearest existing ancestor is a writable directory;
    a read-only file system counts as not writable, for root too)."""
    path = Path(path)
    base = first_existing(path)
    if base.exists() and not base.is_dir():
        where = "is a file" if base == Path(os.path.abspath(path)) else f"is under {base}, a file"
        raise UsageError(f"{flag} {path} {where}; give a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {base} is not writable (read-only file system or no "
                         f"permission); choose a directory you can write to")


def check_new_run_dir(flag: str, path: str | os.PathLike) -> None:
    """A new run may go to ``path``: :func:`check_writable_dir`, and ``path`` is new, empty or
    one of our runs (a run directory with config.json is refused later with the --resume
    hint); a non-empty folder that is not a run is refused, so a run never mixes its files
    with a user's."""
    check_writable_dir(flag, path)
    path = Path(path)
    if path.is_dir() and not (path / "config.json").exists():
        others = sorted(p.name for p in path.iterdir()
                        if p.name not in _OURS and not (p.name.startswith(".")
                                                        and p.name.endswith(".tmp")))
        if others:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise UsageError(f"{flag} {path} is a non-empty directory that is not a run "
                             f"({shown}); choose a new or empty directory")


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the file system that holds ``path`` (or would hold it)."""
    return shutil.disk_usage(first_existing(Path(path))).free


def check_free_space(flag: str, path: str | os.PathLike, needed: int) -> None:
    """At least ``needed`` bytes free where ``path`` is (or will be), else a one-line refusal
    stating both figures."""
    free = free_bytes(path)
    if free < needed:
        raise UsageError(f"{flag} {path}: {mib(free)} free, this run needs about {mib(needed)} "
                         f"(checkpoints, experts, the synthetic set); free some space or choose "
                         f"another place")


def mib(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB"
