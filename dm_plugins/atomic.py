"""Atomic file writing: a temp file in the target's directory, fsync, ``os.replace``.

A reader never sees a half-written file, and a crash leaves the previous version intact. Used
for synthetic sets, checkpoints, expert caches, results and manifests.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from typing import Any, Callable

import torch

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_torch_save", "DiskFull"]


class DiskFull(OSError):
    """An atomic write ran out of space (ENOSPC or a quota). ``filename`` is the file it was
    writing, ``written`` how many bytes of it had been written when known; the previous version
    of the file, if any, is intact."""

    def __init__(self, path: str, written: int | None = None):
        super().__init__(errno.ENOSPC, "No space left on device", path)
        self.written = written


def _out_of_space(exc: BaseException, directory: str) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    # torch.save reports a failed write of its zip container as a RuntimeError ("unexpected
    # pos N vs M" in torch 2, "PytorchStreamWriter failed writing ..." before), with the file
    # object's own OSError, when there is one, as its context (a quota leaves free space)
    if isinstance(exc, RuntimeError) and isinstance(exc.__context__, OSError):
        return _out_of_space(exc.__context__, directory)
    text = str(exc).lower()
    if isinstance(exc, RuntimeError) and ("writ" in text or "unexpected pos" in text):
        try:
            return shutil.disk_usage(directory).free < 1 << 20
        except OSError:
            return False
    return False


def _read_umask() -> int:
    # os.umask can only be read by setting it; done once at import time.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_read_umask()


def _atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            written = os.path.getsize(tmp)
        except OSError:
            written = None
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if not isinstance(exc, DiskFull) and _out_of_space(exc, directory):
            raise DiskFull(path, written) from exc
        raise
    try:  # make the rename itself durable; not possible on every platform/filesystem
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, fsync, replace)."""
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON (indent 2, trailing newline) to ``path`` atomically.

    The parent directory is created if needed. Raises ``TypeError`` (and leaves any existing file
    untouched) if ``obj`` is not JSON-serialisable.
    """
    text = json.dumps(obj, indent=2) + "\n"  # serialise first: a failure must not touch the file
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` atomically; the parent directory is created if needed."""
    _atomic_write(path, lambda f: torch.save(obj, f))
