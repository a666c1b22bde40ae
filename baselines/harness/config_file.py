"""Settings from a JSON file (``--config FILE``): a layer below the command line and above the
preset, so a previous run's ``config.json`` reruns as it was, and the paper's rows live as
files in ``configs/`` instead of long shell lines.

A file holds config keys as ``config.json`` records them (``lr_img``, ``plugins`` as a list or a
comma string, ``dsa`` as a boolean, ``eval_arch`` as a list, ``cap_end``, ...). Bookkeeping keys
of a run (``sources``, ``environment``, ``world_size``, ``method``) are ignored, ``method`` after
checking it names this command line; a ``preset`` in the file applies unless ``--preset`` is
given. Any other unknown key is refused, so a typo never passes silently.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .common import UsageError

BOOKKEEPING = ("sources", "environment", "world_size", "method", "preset")


def read_config_file(path: str, spec, parser) -> tuple[dict[str, Any], str | None]:
    """``(values by argparse dest, preset or None)`` of the settings file ``path`` for the
    command line ``spec`` whose parser is ``parser``; a UsageError (one line) for a file that
    is missing, not a JSON object, of another method, or holding an unknown key."""
    from .plugin_flags import LEGACY_KEYS
    from .settings import BY_DEST, from_config
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UsageError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise UsageError(f"--config {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path} must hold a JSON object of settings")
    method = data.get("method", spec.name)
    if method != spec.name:
        raise UsageError(f"--config {path} holds settings of {method!r}, not {spec.name!r}; "
                         f"use baselines/{method}.py")
    dests = {a.dest: a for a in parser._actions}
    legacy = {old: new for new, old in LEGACY_KEYS.items()}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in BOOKKEEPING:
            continue
        dest, parsed = from_config(legacy.get(key, key), value)
        row = BY_DEST.get(dest)
        if dest not in dests or dest == "help" or (row is not None and not row.record):
            raise UsageError(f"--config {path}: unknown setting {key!r} (keys are config.json's, "
                             f"e.g. lr_img, plugins, cap_end)")
        values[dest] = parsed
    preset = data.get("preset")
    if preset is not None and preset not in spec.preset_names:
        raise UsageError(f"--config {path}: unknown preset {preset!r}; choose from "
                         f"{', '.join(spec.preset_names)}")
    return values, preset
