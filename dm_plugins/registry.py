"""Which plugins exist, and how a named one is found and built: the plugin registry.

Contract: :func:`available_plugins` is the one table of plugin names -> factories (the three
built-ins, which an entry point cannot override, plus the ``dm_plugins`` entry-point group,
loaded lazily, sorted by name). :func:`parse_plugin_names` and :func:`check_plugin_names` turn a
``"cap,ptm"`` spec into checked names, :func:`plugins_need_experts` says whether any of them
needs an expert pool, and ``_call_with_accepted`` calls a factory with the options its signature
takes. Every failure is a one-line :class:`~dm_plugins.errors.PluginError`. Nothing here builds a
pluggy manager or calls a hook: that is :class:`dm_plugins.manager.PluginSet`.
"""
from __future__ import annotations

import inspect
from importlib.metadata import entry_points
from typing import Any, Callable

from .errors import PluginError
from .options import declared_options

__all__ = ["ENTRY_POINT_GROUP", "builtin_plugins", "available_plugins", "parse_plugin_names",
           "check_plugin_names", "plugins_need_experts"]

ENTRY_POINT_GROUP = "dm_plugins"


def builtin_plugins() -> dict[str, Callable[..., Any]]:
    """The three PTLM plugins by name; each class states its own name (``cls.name``)."""
    from .capacity import CapacityMatching
    from .pseudo_label import PseudoLabelMatching
    from .trajectory import PseudoTrajectoryMatching
    return {cls.name: cls for cls in (CapacityMatching, PseudoTrajectoryMatching,
                                      PseudoLabelMatching)}


def available_plugins() -> dict[str, Callable[..., Any]]:
    """Built-in plugins plus third-party ones from the ``dm_plugins`` entry-point group.

    An entry point names a factory (usually a class) called with keyword options. Built-in names
    cannot be overridden by an entry point.
    """
    found = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in found:
            found[ep.name] = ep
    factories: dict[str, Callable[..., Any]] = {}
    for name, ep in found.items():
        factories[name] = _LazyEntryPoint(ep)
    factories.update(builtin_plugins())
    return dict(sorted(factories.items()))


class _LazyEntryPoint:
    """Loads an entry point only when its plugin is actually requested."""

    def __init__(self, ep):
        self.ep = ep

    def load(self) -> Callable[..., Any]:
        """The factory the entry point names; a broken package is a one-line PluginError."""
        try:
            return self.ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken third-party package, one line
            raise PluginError(f"plugin {self.ep.name!r} ({self.ep.value}) failed to import: "
                              f"{type(exc).__name__}: {exc}") from None

    def __call__(self, **options):
        return _call_with_accepted(self.load(), options)

    @property
    def needs_experts(self) -> bool:
        return bool(getattr(self.load(), "needs_experts", False))

    @property
    def options(self):
        return declared_options(self.load())


def parse_plugin_names(spec: str | None) -> list[str]:
    """``"cap,ptm,plm"`` -> ``["cap", "ptm", "plm"]``; ``"none"``, ``""`` or None -> ``[]``.

    Names are lower-cased and stripped; a name listed twice is a :class:`PluginError`.
    """
    if spec is None:
        return []
    names = [n.strip().lower() for n in spec.split(",") if n.strip()]
    if names == ["none"]:
        return []
    if "none" in names:
        raise PluginError(f"'none' cannot be combined with other plugins (got {spec!r})")
    seen = set()
    for n in names:
        if n in seen:
            raise PluginError(f"plugin {n!r} is listed twice in {spec!r}")
        seen.add(n)
    return names


def check_plugin_names(spec: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Parse ``spec`` and check every name is available, without building anything.

    Raises :class:`PluginError` (one line listing the available names) for an unknown name.
    """
    return _check_names(spec, available_plugins)


def _check_names(spec: str | list[str] | tuple[str, ...] | None,
                 factories: Callable[[], dict[str, Callable[..., Any]]]) -> list[str]:
    """:func:`check_plugin_names` against the plugins ``factories()`` returns (called after
    parsing): :meth:`PluginSet.from_names` checks against the same table it builds from."""
    names = parse_plugin_names(",".join(spec) if isinstance(spec, (list, tuple)) else spec)
    found = factories()
    for name in names:
        if name not in found:
            raise PluginError(f"unknown plugin {name!r}; available: "
                              f"{', '.join(found)} (or 'none')")
    return names


def plugins_need_experts(spec: str | list[str] | tuple[str, ...] | None) -> bool:
    """True when any named plugin declares ``needs_experts = True`` (a class attribute).

    Lets a run driver decide whether to load or train an expert pool without knowing plugins
    by name.
    """
    factories = available_plugins()
    return any(bool(getattr(factories[name], "needs_experts", False))
               for name in check_plugin_names(spec))


def _call_with_accepted(factory: Callable[..., Any], options: dict[str, Any],
                        required: dict[str, Any] | None = None):
    """Call ``factory`` with the options its signature accepts (all of them if it has **kw);
    those in ``required`` (its declared options) are always passed."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return factory(**options)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return factory(**options)
    keep = set(params) | set(required or {})
    return factory(**{k: v for k, v in options.items() if k in keep})
