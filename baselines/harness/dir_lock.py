"""A lock file that keeps a second process out of a directory another one is writing.

A distillation run directory and an ablation directory are each written by one process at a
time: two ``--resume`` of the same run, or the same ``ablate.py`` command started twice, would
otherwise write the same checkpoints and cells at once. The lock is ``DIR/.lock``, holding the
owner's pid, host and start time as JSON, hard-linked into place from a complete temp file (so
of two processes racing for it exactly one wins, and none reads it half-written). A lock whose
owner is gone (same host, no such pid) is stale and taken over; one held by a live process, or
by another host (whose processes cannot be checked from here), is refused with a message naming
the owner and how to clear it.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

__all__ = ["DirectoryInUse", "DirectoryLock"]

LOCK_NAME = ".lock"


class DirectoryInUse(Exception):
    """Another process holds the directory's lock (one-line message saying what to do)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


class DirectoryLock:
    """``DIR/.lock`` for one process. :meth:`acquire` raises :class:`DirectoryInUse` when a
    live process (or another host) holds it; :meth:`release` removes it if it is ours. A
    process may acquire a lock it already holds (a second run in the same process)."""

    def __init__(self, directory: str | os.PathLike, what: str = "directory"):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.what = what
        self.held = False

    def _owner(self) -> dict | None:
        try:
            owner = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable (edited, or a disk error): treated as stale
        return owner if isinstance(owner, dict) else {}  # edited into another JSON value

    def _is_stale(self, owner: dict) -> bool:
        if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            return True  # ours (an earlier run in this process that did not release it)
        if not owner or not isinstance(owner.get("pid"), int):
            return True
        return owner.get("host") == socket.gethostname() and not _alive(owner["pid"])

    def in_use(self) -> bool:
        """Whether another live process holds the lock now (read only; nothing is taken)."""
        owner = self._owner()
        return owner is not None and not self._is_stale(owner)

    def _create(self, record: bytes) -> bool:
        """Create the lock with ``record`` in it; False when it exists. Written to a temp file
        and hard-linked into place, so no process ever reads a half-written lock."""
        temp = self.directory / f"{LOCK_NAME}-{os.getpid()}.new"
        temp.write_bytes(record)
        try:
            os.link(temp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links on this filesystem: exclusive create instead
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(record)
            return True
        finally:
            temp.unlink(missing_ok=True)

    def acquire(self) -> "DirectoryLock":
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
        for _ in range(5):  # a stale lock is removed, then created again (a racer may win)
            if self._create(record):
                self.held = True
                return self
            owner = self._owner()
            if owner is None:
                continue  # released meanwhile
            if not self._is_stale(owner):
                raise DirectoryInUse(
                    f"{self.what} {self.directory} is in use by process {owner['pid']} on "
                    f"{owner.get('host', '?')} (since {owner.get('started', '?')}); wait for "
                    f"it or stop it; if no such process is running, delete {self.path}")
            if self._owner() == owner:  # not already replaced by a racer who took it over
                self.path.unlink(missing_ok=True)
        raise DirectoryInUse(f"{self.what} {self.directory}: could not take {self.path} "
                             f"(other processes keep taking it); try again")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        owner = self._owner()
        if owner is not None and owner.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
