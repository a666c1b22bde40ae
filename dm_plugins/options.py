"""Options a plugin declares for itself (in the manner of pytest's ``pytest_addoption``).

A plugin class lists its settings in a class attribute ``options``, a tuple of
:class:`PluginOption`; each one is also a keyword argument of the class. From that one list come

* the command-line flags ``--<plugin>-<option>`` of every run driver (``--cap-end``,
  ``--plm-logits``; a third-party plugin from the ``dm_plugins`` entry-point group gets its
  flags the same way);
* what ``config.json`` records: one key ``<plugin>_<option>`` per option (``cap_end``), which
  ``--resume`` and ``baselines/ablate.py`` treat like every other setting;
* the routing in :meth:`dm_plugins.PluginSet.from_names`: a plugin receives only its own
  options (``options={"cap": {"end": 0.5}}``), never another plugin's.

Shared resources that are not a plugin's own setting (the expert pool, ``compile``) are passed
to every factory that accepts them (:data:`RESOURCES`).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from .errors import PluginError

RESOURCES = ("experts", "compile", "expert_pools")
"""Keyword arguments every plugin factory that accepts them receives (not options):
``experts``, the run's :class:`~dm_plugins.ExpertPool`; ``compile``, whether to torch.compile;
``expert_pools``, a callable ``expert_pools(arch) -> ExpertPool`` giving a pool of another
architecture trained on the run's data (the harness trains it on first use; absent, None,
where a loop offers none)."""

Check = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class PluginOption:
    """One setting of a plugin.

    Attributes:
        name: the keyword argument of the plugin class (``end``); the flag is
            ``--<plugin>-<name>`` with ``_`` written ``-``, the config key ``<plugin>_<name>``.
        type: ``int``, ``float`` or ``str`` (how a command-line value is parsed).
        default: the value when nobody sets it (the paper's).
        help: one sentence for ``--help``; say which reading (paper or code) each value is.
        choices: the allowed values (``str`` options), or None.
        check: ``check(value)`` returns None when the value is allowed, else what is wrong
            (``"must be >= 1"``); run before any work starts.
    """

    name: str
    type: type
    default: Any
    help: str
    choices: Sequence[Any] | None = None
    check: Check | None = None

    def flag(self, plugin: str) -> str:
        return f"--{plugin}-{self.name}".replace("_", "-")

    def key(self, plugin: str) -> str:
        """The argparse dest and config key: ``<plugin>_<option>``, a ``-`` in the plugin's
        name written ``_`` (``iid-cm`` -> ``iid_cm_weight``)."""
        return f"{plugin}_{self.name}".replace("-", "_")

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` (None when it is allowed)."""
        if self.choices is not None and value not in self.choices:
            return f"must be one of {', '.join(map(str, self.choices))}"
        if self.type in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return "must be a number"
            if not math.isfinite(value):
                return "must be finite"
            if self.type is int and int(value) != value:
                return "must be an integer"
        return None if self.check is None else self.check(value)


def at_least(low: float) -> Check:
    return lambda v: None if v >= low else f"must be >= {low:g}"


def above(low: float) -> Check:
    return lambda v: None if v > low else f"must be > {low:g}"


def in_unit_interval(v: float) -> str | None:
    """(0, 1]."""
    return None if 0 < v <= 1 else "must be in (0, 1]"


def declared_options(factory: Any) -> tuple[PluginOption, ...]:
    """The options a plugin factory declares (``factory.options``; none when it has none).
    Each must be a keyword argument of the factory (a PluginError naming the first that is
    not: the drivers pass every option, its default included)."""
    options = getattr(factory, "options", ())
    if not all(isinstance(o, PluginOption) for o in options):
        raise PluginError(f"{factory!r}.options must be a tuple of dm_plugins.PluginOption")
    for option in options:
        if not _accepts(factory, option.name):
            label = getattr(factory, "__qualname__", None) or repr(factory)
            raise PluginError(f"plugin {getattr(factory, 'name', label)!r} declares the option "
                              f"{option.name!r}, which {label}() does not take as a keyword "
                              f"argument; add it to the signature or drop the option")
    return tuple(options)


def _accepts(factory: Any, name: str) -> bool:
    """Whether ``factory(name=...)`` is accepted by its signature (True when unknown)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return True
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return True
    return name in params and params[name].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                    inspect.Parameter.KEYWORD_ONLY)


def check_options(plugin: str, factory: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` checked against ``factory``'s declared options: a :class:`PluginError` (one
    line naming the flag) for an unknown option or a value the option refuses; returns them."""
    declared = {o.name: o for o in declared_options(factory)}
    for name, value in values.items():
        if name not in declared:
            known = ", ".join(declared) or "none"
            raise PluginError(f"plugin {plugin!r} has no option {name!r} (its options: {known})")
        problem = declared[name].problem(value)
        if problem:
            raise PluginError(f"{declared[name].flag(plugin)} {problem}, got {value!r}")
    return dict(values)


def options_from_config(plugin: str, factory: Any, config: Mapping[str, Any],
                        legacy: Mapping[str, str] = {}) -> dict[str, Any]:
    """The options of ``plugin`` recorded in a flat config (keys ``<plugin>_<option>``); an
    option missing there is taken from its ``legacy`` key (an older config's name, e.g.
    ``alpha`` for ``cap_alpha``) or left to the plugin's default."""
    values = {}
    for option in declared_options(factory):
        key = option.key(plugin)
        if key in config:
            values[option.name] = config[key]
        elif legacy.get(key) in config:
            values[option.name] = config[legacy[key]]
    return values
