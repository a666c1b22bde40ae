"""Command-line flags of the plugins' own options, from what each plugin declares.

Every plugin found by :func:`dm_plugins.available_plugins` (built-in or from the ``dm_plugins``
entry-point group) gets one flag per :class:`dm_plugins.options.PluginOption` it declares:
``--<plugin>-<option>`` with argparse dest and config key ``<plugin>_<option>`` (``--cap-end``
-> ``cap_end``). The flags exist whatever ``--plugins`` says, so that ``baselines/ablate.py``
can pass one set of options to every cell and ``config.json`` records them all.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable, Mapping

from dm_plugins.options import declared_options, options_from_config

LEGACY_FLAGS = {"cap_alpha": "--alpha", "ptm_lam": "--lam", "plm_tau": "--tau"}
"""Old flat flags, still accepted as aliases of the plugin's own flag (to be removed in 0.3)."""
LEGACY_KEYS = {key: flag[2:] for key, flag in LEGACY_FLAGS.items()}
"""config.json keys of runs written before options belonged to their plugin."""


def plugin_option_table() -> list[tuple[str, Any]]:
    """``(plugin name, PluginOption)`` for every option of every available plugin; a
    third-party plugin that fails to import contributes none (its error shows when it is
    chosen)."""
    from dm_plugins import available_plugins

    rows = []
    for name, factory in available_plugins().items():
        try:
            options = declared_options(factory)
        except Exception:  # noqa: BLE001 - a broken third-party package must not break --help
            continue
        rows += [(name, option) for option in options]
    return rows


def add_plugin_flags(parser: argparse.ArgumentParser,
                     describe: Callable[[str], str] = lambda key: "") -> None:
    """One flag per plugin option, in a group per plugin. ``describe(key)`` adds the presets'
    values of a key to its help."""
    groups: dict[str, Any] = {}
    for plugin, option in plugin_option_table():
        if plugin not in groups:
            groups[plugin] = parser.add_argument_group(f"plugin {plugin}")
        key = option.key(plugin)
        names = [option.flag(plugin)] + ([LEGACY_FLAGS[key]] if key in LEGACY_FLAGS else [])
        extra = describe(key)
        text = (f"{option.help} (default {option.default}{'; ' + extra if extra else ''})"
                + (f"; {LEGACY_FLAGS[key]} is its old name" if key in LEGACY_FLAGS else ""))
        try:
            groups[plugin].add_argument(*names, dest=key, type=option.type,
                                        default=option.default, choices=option.choices,
                                        help=text)
        except argparse.ArgumentError:  # a third-party flag that clashes with a core one
            continue


def check_plugin_flags(config: Mapping[str, Any]) -> None:
    """Every plugin option in ``config`` allowed by its declaration, else a UsageError naming
    the flag (before any work)."""
    from .common import UsageError

    for plugin, option in plugin_option_table():
        key = option.key(plugin)
        if key in config:
            problem = option.problem(config[key])
            if problem:
                raise UsageError(f"{option.flag(plugin)} {problem}, got {config[key]!r}")


def check_host_offers(config: Mapping[str, Any], offers: frozenset[str], host: str) -> None:
    """A UsageError (one line) when a chosen plugin's options need something the host does
    not offer (:attr:`dm_plugins.DistillContext.offers`; a plugin states it with
    ``needs_for(options)`` and ``refusal(needs, offers, host)``), before any work."""
    from dm_plugins import available_plugins

    from .common import UsageError

    factories = available_plugins()
    for name, options in plugin_options(config).items():
        needs_for = getattr(factories[name], "needs_for", None)
        refusal = getattr(factories[name], "refusal", None)
        if needs_for is None or refusal is None:
            continue
        problem = refusal(needs_for(options), offers, host)
        if problem:
            raise UsageError(problem)


def plugin_options(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The options of each plugin the run uses, read from its config (older configs' flat
    ``alpha`` / ``lam`` / ``tau`` keys too): what :meth:`dm_plugins.PluginSet.from_names` takes
    as ``options``."""
    from dm_plugins import available_plugins

    factories = available_plugins()
    return {name: options_from_config(name, factories[name], config, LEGACY_KEYS)
            for name in config.get("plugins", [])}


def recorded(config: Mapping[str, Any], key: str, missing: Any) -> Any:
    """``config[key]``, or its legacy key's value in an older config, or ``missing``."""
    if key in config:
        return config[key]
    return config.get(LEGACY_KEYS.get(key, key), missing)
