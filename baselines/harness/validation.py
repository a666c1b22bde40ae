"""Every setting of a run checked before any file is written or any work starts.

One layer for the command lines that share the run driver (``baselines/dm.py``, ``idm.py``,
``dance.py``): :func:`check_config` takes the resolved config and raises
:class:`~baselines.harness.common.UsageError` with one line naming the flag, the value and what
to do. Methods add their own settings through :attr:`MethodSpec.checks` (a map from config key
to one of the rule names in :data:`RULES`).
"""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping

from .common import UsageError


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "positive": (lambda v: _is_number(v) and v >= 1, "must be >= 1"),
    "nonnegative": (lambda v: _is_number(v) and v >= 0, "must be >= 0"),
    "positive_float": (lambda v: _is_number(v) and v > 0, "must be > 0"),
    "momentum": (lambda v: _is_number(v) and 0 <= v < 1, "must be in [0, 1)"),
}
"""Rule name -> (check, what the message says)."""

SHARED_CHECKS: dict[str, str] = {
    "iterations": "positive", "batch_real": "positive", "factor": "positive",
    "lr_img": "positive_float", "momentum": "momentum", "num_experts": "positive",
    "expert_epochs": "positive", "eval_runs": "nonnegative", "eval_epochs": "positive",
    "checkpoint_every": "positive", "log_every": "positive", "eval_every": "nonnegative",
}
"""The rules every method's config obeys (the plugins' options are checked by what each plugin
declares, ``baselines/harness/plugin_flags.py``)."""

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_value(key: str, value: Any, rule: str) -> None:
    check, text = RULES[rule]
    if not check(value):
        raise UsageError(f"{_flag(key)} {text}, got {value!r}")


def check_config(config: Mapping[str, Any], checks: Mapping[str, str] = (), *,
                 image_size: int | None = None, out: str | None = None) -> None:
    """Refuse a config that cannot run, before anything is written: the shared numeric rules,
    the method's ``checks``, known network names, a known device, ``--factor`` small enough for
    the image size, and ``--out`` / ``--experts`` that are not files."""
    from .networks import available_networks

    for key, rule in {**SHARED_CHECKS, **dict(checks)}.items():
        if key in config:
            check_value(key, config[key], rule)
    known = available_networks()
    for flag, names in (("--arch", [config.get("arch", "convnet")]),
                        ("--eval-arch", list(config.get("eval_arch", [])))):
        for name in names:
            if name not in known:
                raise UsageError(f"{flag}: unknown network {name!r}; choose from "
                                 f"{', '.join(known)}")
    if config.get("eval_runs", 0) > 0 and not config.get("eval_arch"):
        raise UsageError("--eval-arch names no network; give one (e.g. convnet) or "
                         "--eval-runs 0")
    check_snapshots(config)
    device = str(config.get("device", "auto"))
    if not _DEVICE.match(device):
        raise UsageError(f"--device: unknown device {device!r}; use cpu, cuda, cuda:N or auto")
    if image_size is not None and config.get("factor", 1) > image_size // 4:
        raise UsageError(f"--factor {config['factor']} splits a {image_size}-px image into cells "
                         f"under 4 px; use at most {image_size // 4}")
    for key, path in (("out", out), ("experts", config.get("experts"))):
        if path and Path(path).exists() and not Path(path).is_dir():
            raise UsageError(f"{_flag(key)} {path} is a file; give a directory")


def check_snapshots(config: Mapping[str, Any]) -> None:
    """``--eval-at`` / ``--eval-every``: whole iterations in ``0..--iterations``, and evaluation
    runs to evaluate them with."""
    points = config.get("eval_at") or []
    if not isinstance(points, list) or not all(_is_number(p) and p == int(p) and p >= 0
                                               for p in points):
        raise UsageError(f"--eval-at must list whole iterations >= 0, got {points!r}")
    iterations = config.get("iterations")
    late = [p for p in points if _is_number(iterations) and p > iterations]
    if late:
        raise UsageError(f"--eval-at {late[0]} is past the run's last iteration "
                         f"(--iterations {iterations}); give points in 0..{iterations}")
    if (points or config.get("eval_every")) and config.get("eval_runs", 0) < 1:
        flag = "--eval-at" if points else "--eval-every"
        raise UsageError(f"{flag} needs evaluation runs to evaluate its points; give "
                         f"--eval-runs >= 1")


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``error: <prog>: <message>`` and exit 2
    (argparse's default prints the whole usage block first)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")
