"""Settings resolved with provenance, the config.json they make, and the checks ``--resume``
makes against a recorded config; all read the table in :mod:`baselines.harness.settings`."""
from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any, Mapping

from .settings import BY_DEST, FREE, REFUSED, SETTINGS, config_key, to_config
from .spec import EMBEDDED, LAYERED, MethodSpec, Rule

if TYPE_CHECKING:  # pragma: no cover
    from .datasets import Dataset

COMMAND_LINE = "command line"
EMBEDDED_SOURCE = "embedded dataset"

OPTIONAL_ON_RESUME = frozenset({"preset", "experts", "expert_seed", "expert_recipe",
                                "eval_compile", "eval_at", "eval_every", "world_size", "environment", "sources"})
"""Keys a run's config.json may lack and still resume (read with a default: runs written before
they existed); every other setting of the method must be there."""

_BOOKKEEPING_DESTS = frozenset({"config_values"})
"""Attributes of the parsed arguments that are no flag (``--config``'s values)."""


def _not_a_setting(dest: str) -> bool:
    row = BY_DEST.get(dest)
    return dest in _BOOKKEEPING_DESTS or (row is not None and not row.record)


def resolve_settings(spec: MethodSpec, args: argparse.Namespace, dataset: "Dataset",
                     explicit: frozenset[str] | set[str] = frozenset()
                     ) -> tuple[dict[str, Any], dict[str, str]]:
    """Every argparse destination's value and source, by precedence: command line >
    ``--config`` file > preset > embedded-dataset budget > method default > parser default (the
    last two both read ``method <name>``). ``explicit`` lists the destinations given on the
    command line (see :func:`baselines.harness.command_line.parse_args`); a
    :data:`~baselines.harness.spec.LAYERED` one that is not None counts as given anyway, since
    its parser default is None."""
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if getattr(args, "config_values", None):
        layers.append((f"config file {args.config}", args.config_values))
    preset = getattr(args, "preset", None) or spec.name
    if preset != spec.name:
        if preset not in spec.presets:
            from .common import UsageError
            raise UsageError(f"unknown preset {preset!r}; choose from "
                             f"{', '.join(spec.preset_names)}")
        layers.append((f"preset {preset}", spec.presets[preset].values))
    if dataset.name == EMBEDDED:
        layers.append((EMBEDDED_SOURCE, spec.embedded_budget))
    method = f"method {spec.name}"
    layers.append((method, spec.defaults))

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    rules: dict[str, Rule] = {}
    for key, given in vars(args).items():
        if key in explicit or (key in LAYERED and given is not None):
            values[key], sources[key] = given, COMMAND_LINE
            continue
        for source, layer in layers:
            if key in layer:
                sources[key] = source
                if isinstance(layer[key], Rule):
                    rules[key] = layer[key]
                else:
                    values[key] = layer[key]
                break
        else:
            values[key], sources[key] = given, method
    settings = dict(values)
    for key, rule in rules.items():
        values[key] = rule.fn(dataset, settings)
    missing = [key for key in LAYERED if values.get(key) is None]
    if missing:
        raise ValueError(f"method {spec.name!r} resolved no default for {', '.join(missing)}")
    return values, sources


def resolve_config(spec: MethodSpec, args: argparse.Namespace, dataset: "Dataset",
                   explicit: frozenset[str] | set[str] = frozenset()) -> dict:
    """What config.json records: ``method``, ``preset``, every setting of the table (in its
    order, as its row writes it), the method's own arguments and the plugins' options, and
    ``sources`` (where each value came from)."""
    values, sources = resolve_settings(spec, args, dataset, explicit)
    config: dict[str, Any] = {"method": spec.name,
                              "preset": getattr(args, "preset", None) or spec.name}
    for row in SETTINGS:
        if row.record and row.dest in values:
            config[row.config_key] = row.write(values[row.dest], values)
    config["dataset"] = dataset.name  # canonical, e.g. imagefolder:<absolute path>
    for dest, value in values.items():  # the method's own arguments and the plugins' options
        if dest not in BY_DEST and not _not_a_setting(dest) and dest not in config:
            config[dest] = value
    config["sources"] = {config_key(dest): source for dest, source in sources.items()
                         if not _not_a_setting(dest)}
    return config


def check_resume_flags(args: argparse.Namespace, explicit, config: dict, path) -> None:
    """Flags given with ``--resume`` must agree with the recorded config (which wins); a
    UsageError naming the first that does not."""
    from .common import UsageError
    from .plugin_flags import recorded as recorded_value

    values = vars(args)
    for dest in sorted(explicit):
        row = BY_DEST.get(dest)
        on_resume = row.on_resume if row else "same"
        if on_resume == FREE:
            continue
        if on_resume == REFUSED:
            raise UsageError(f"{row.option} cannot be combined with --resume (the run stays in "
                             f"{path})")
        given = values[dest]
        if row is not None and row.resume_ignores is not None and given == row.resume_ignores:
            continue
        recorded = recorded_value(config, config_key(dest), "<not recorded>")
        if to_config(dest, given, values) != recorded:
            flag = "--" + dest.replace("_", "-")
            raise UsageError(f"--resume continues {path} with its recorded settings, and {flag} "
                             f"{given} differs from the recorded {recorded!r}; drop "
                             f"{flag} (or start a new run)")


def required_keys(spec: MethodSpec) -> set[str]:
    """The config keys a run of ``spec`` must record to be resumed: every setting of its command
    line (the plugins' options fall back to their defaults) and ``method``."""
    from .command_line import build_parser
    from .plugin_flags import plugin_option_table
    options = {option.key(plugin) for plugin, option in plugin_option_table()}
    keys = {config_key(a.dest) for a in build_parser(spec)._actions
            if a.dest != "help" and not _not_a_setting(a.dest)}
    return (keys | {"method"}) - options - OPTIONAL_ON_RESUME


def config_differences(recorded: dict, now: dict) -> list[str]:
    """The keys whose values differ between two configs (``sources`` and ``environment`` are
    bookkeeping, not settings; an optional key removed from ``now``, as in a run written before
    it existed, reads with its default and is no difference)."""
    keys = (set(recorded) | set(now)) - {"sources", "environment"}
    keys -= {k for k in OPTIONAL_ON_RESUME if k not in now}
    return sorted(k for k in keys if recorded.get(k, "<absent>") != now.get(k, "<absent>"))


def default_out(config: dict) -> str:
    """``runs/<method>[-<preset>]-<dataset>-ipc<ipc>-<plugins>-s<seed>`` (the preset only when
    it is not the method's own)."""
    name = config["dataset"].split(":", 1)[-1].rstrip("/").split("/")[-1]
    plugins = "+".join(config["plugins"]) or "none"
    method = config["method"]
    preset = config.get("preset", method)
    prefix = method if preset == method else f"{method}-{preset}"
    return os.path.join("runs", f"{prefix}-{name}-ipc{config['ipc']}-{plugins}-s{config['seed']}")


def unused_path(path: str) -> str:
    """``path``, or ``path-2``, ``path-3``, ... if it is taken (default run names only)."""
    candidate, n = path, 1
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}-{n}"
    return candidate
