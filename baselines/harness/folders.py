"""The folders a step creates, so that a step that fails can remove them again (no empty
``runs/`` or ``data/MNIST/raw/`` left behind). No harness imports: the dataset loaders and the
run directories both use it."""
from __future__ import annotations

import os
from pathlib import Path


def missing_ancestors(path: str | os.PathLike) -> list[Path]:
    """The directories ``path`` and its ancestors that do not exist yet, deepest first (what
    creating ``path`` would create)."""
    path = Path(os.path.abspath(path))
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def remove_if_empty(paths: list[Path]) -> None:
    """Remove each of ``paths`` (deepest first) that exists and is an empty directory: what a
    refused or failed attempt created and left empty."""
    for path in paths:
        try:
            path.rmdir()
        except OSError:
            pass
