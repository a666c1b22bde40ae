"""Settings from a JSON file (``--config FILE``): a layer below the command line and above the
preset, so a previous run's ``config.json`` reruns as it was, and the paper's rows live as
files in ``configs/`` instead of long shell lines.

A file holds config keys as ``config.json`` records them (``lr_img``, ``plugins`` as a list or a
comma string, ``dsa`` as a boolean, ``eval_arch`` as a list, ``cap_end``, ...). Bookkeeping keys
of a run (``sources``, ``environment``, ``world_size``, ``method``) are ignored, ``method`` after
checking it names this command line; a ``preset`` in the file applies unless ``--preset`` is
given. Any other unknown key is refused, so a typo never passes silently.

Each value is checked against its setting's type before any work (:func:`check_value`): a whole
number for an ``int`` setting, a number for a ``float`` one, JSON ``true`` / ``false`` for a
switch (``dsa``, ``compile``: a string such as ``"false"`` is refused, never read as true), a
string (one of the choices, if any) for the others, and ``null`` only where the setting has no
default (``experts``, ``expert_seed``). A value that does not fit is a UsageError naming the key.
"""
from __future__ import annotations

import argparse
import json
import math
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
        values[dest] = check_value(path, key, value, parsed, dests[dest], spec,
                                   listed=row is not None and row.read(["x"]) != ["x"])
    preset = data.get("preset")
    if preset is not None and preset not in spec.preset_names:
        raise UsageError(f"--config {path}: unknown preset {preset!r}; choose from "
                         f"{', '.join(spec.preset_names)}")
    return values, preset


def _shown(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _unquoted(value: Any, parses) -> str:
    """`` (write X without quotes)`` when the string ``value`` holds what the setting wants."""
    if isinstance(value, str):
        try:
            parses(value.strip())
        except (TypeError, ValueError):
            return ""
        return f" (write {value.strip()} without quotes)"
    return ""


def _json_bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise ValueError(text)
    return text.lower() == "true"


def check_value(path: str, key: str, raw: Any, parsed: Any, action: argparse.Action,
                spec, listed: bool = False) -> Any:
    """The value of ``key`` (``raw`` as the file holds it, ``parsed`` as its setting's row reads
    it) to use for the argparse ``action``'s setting, or a UsageError when its JSON type does not
    fit: a switch takes ``true`` / ``false`` only, an ``int`` setting a whole number, a
    ``float`` one a finite number, a setting with choices one of them, any other a string
    (a ``listed`` setting, one config.json records as a list such as ``plugins`` or
    ``eval_at``, also a list); ``null`` only where the setting's default is none (its parser
    default is None and the method defines none)."""
    def refuse(what: str, hint: str = "") -> UsageError:
        return UsageError(f"--config {path}: {key} must be {what}, got {_shown(raw)}{hint}")

    if action.nargs == 0:  # a switch (--no-dsa, --compile): its config key holds a boolean
        if not isinstance(raw, bool):
            raise refuse("true or false (a JSON boolean)", _unquoted(raw, _json_bool).lower())
        return parsed
    kind = action.type
    if kind is int:
        what = "a whole number"
    elif kind is float:
        what = "a number"
    elif action.choices is not None:
        what = "one of " + ", ".join(map(str, action.choices))
    elif listed:
        what = "a list or a comma string"
    else:
        what = "a string"
    if raw is None:
        if action.default is None and action.dest not in spec.defaults:
            return None
        raise refuse(what)
    if kind is int:
        if isinstance(parsed, bool) or not isinstance(parsed, int):
            raise refuse(what, _unquoted(raw, int))
        return parsed
    if kind is float:
        if (isinstance(parsed, bool) or not isinstance(parsed, (int, float))
                or not math.isfinite(parsed)):
            raise refuse("a finite number" if isinstance(parsed, float) else what,
                         _unquoted(raw, float))
        return float(parsed)
    if not isinstance(parsed, str):
        raise refuse(what)
    if kind not in (None, str):  # a parsing type of its own (--eval-at's list of iterations)
        try:
            kind(parsed)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            raise refuse(what, f" ({exc})") from None
    if action.choices is not None and parsed not in action.choices:
        raise refuse(what)
    return parsed
