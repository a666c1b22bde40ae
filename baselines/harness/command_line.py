"""The parser of a method's command line, built from :data:`baselines.harness.settings.SETTINGS`,
the method's own arguments and the plugins' options."""
from __future__ import annotations

import argparse
from typing import Any

from .settings import SETTINGS
from .spec import MethodSpec, Rule


class DefaultsOnceFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an argument's help only when there is a default to show (not
    None, not a flag's False) and the help text does not state one already (``(default``)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default is None or action.default is argparse.SUPPRESS or action.nargs == 0
                or "(default" in text):
            return text
        return text + " (default: %(default)s)"


def _show(value: Any) -> str:
    if isinstance(value, Rule):
        return value.text
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "none"
    return str(value)


def describe_default(spec: MethodSpec, key: str) -> str:
    """How ``--help`` states ``key``'s default: ``default 20000; [embedded] 100; preset ptlm: 2``
    (the parts that apply)."""
    parts = [f"default {_show(spec.defaults[key])}"] if key in spec.defaults else []
    if key in spec.embedded_budget:
        parts.append(f"[embedded] {_show(spec.embedded_budget[key])}")
    parts += [f"preset {name}: {_show(p.values[key])}" for name, p in spec.presets.items()
              if key in p.values]
    return "; ".join(parts)


def _of(value: Any, spec: MethodSpec) -> Any:
    return value(spec) if callable(value) and not isinstance(value, type) else value


def build_parser(spec: MethodSpec) -> argparse.ArgumentParser:
    """The shared command line (one argument per row of the settings table that applies to
    ``spec``), the method's own arguments, then the plugins' options."""
    from .plugin_flags import add_plugin_flags
    from .validation import OneLineParser
    parser = OneLineParser(prog=spec.program, description=spec.description,
                           formatter_class=DefaultsOnceFormatter)
    for row in SETTINGS:
        if row.only_if is not None and not row.only_if(spec):
            continue
        text = row.help(spec) if callable(row.help) else row.help
        text = text.replace("{d}", f"({describe_default(spec, row.dest)})")
        text = text.replace("{name}", spec.name)
        if row.flag:
            parser.add_argument(row.option, action="store_true", help=text)
            continue
        extra = {"metavar": row.metavar} if row.metavar else {}
        if row.type is not None:
            extra["type"] = row.type
        if row.choices is not None:
            extra["choices"] = _of(row.choices, spec)
        parser.add_argument(row.option, default=_of(row.default, spec), help=text, **extra)
    if spec.add_arguments is not None:
        spec.add_arguments(parser)
    add_plugin_flags(parser, lambda key: "; ".join(
        f"preset {name}: {_show(preset.values[key])}" for name, preset in spec.presets.items()
        if key in preset.values))
    return parser


def parse_args(spec: MethodSpec, argv: list[str] | None = None
               ) -> tuple[argparse.Namespace, frozenset[str]]:
    """Parse ``argv``; also return the destinations given on the command line (even when
    given their default value), which is what ``sources`` calls "command line". With
    ``--config FILE`` its values land in ``args.config_values`` (by dest)."""
    parser = build_parser(spec)
    args = parser.parse_args(argv)
    probe = build_parser(spec)
    for action in probe._actions:  # argparse lists its actions nowhere public
        action.default = argparse.SUPPRESS  # an option not given is then left out
    explicit = frozenset(vars(probe.parse_args(argv)))
    args.config_values = {}
    if args.config is not None:
        from .common import UsageError
        from .config_file import read_config_file
        if args.resume:
            raise UsageError("--config cannot be combined with --resume (the run's own "
                             "config.json is used)")
        args.config_values, preset = read_config_file(args.config, spec, parser)
        if preset is not None and "preset" not in explicit:
            args.preset = preset
        for dest in ("dataset", "data_path"):  # read before the defaults are resolved
            if dest in args.config_values and dest not in explicit:
                setattr(args, dest, args.config_values[dest])
    return args, explicit
