"""Building a set of plugins from names, and the facade hosts call.

Hosts (the minimal loop, the adapters, or a foreign DM loop) talk to :class:`PluginSet`, never
to pluggy directly; it owns the rules for combining several plugins' results (keep-masks ANDed,
auxiliary losses summed, "did anyone set the extractor" ORed).
"""
from __future__ import annotations

import inspect
from importlib.metadata import entry_points
from typing import Any, Callable

import pluggy
import torch

from . import hookspecs
from .context import DistillContext
from .errors import PluginError

ENTRY_POINT_GROUP = "dm_plugins"


def builtin_plugins() -> dict[str, Callable[..., Any]]:
    """The three PTLM plugins by CLI name."""
    from .capacity import CapacityMatching
    from .pseudo_label import PseudoLabelMatching
    from .trajectory import PseudoTrajectoryMatching
    return {"cap": CapacityMatching, "ptm": PseudoTrajectoryMatching, "plm": PseudoLabelMatching}


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

    def __call__(self, **options):
        try:
            factory = self.ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken third-party package, one line
            raise PluginError(f"plugin {self.ep.name!r} ({self.ep.value}) failed to import: "
                              f"{type(exc).__name__}: {exc}") from None
        return _call_with_accepted(factory, options)

    @property
    def needs_experts(self) -> bool:
        return bool(getattr(self.ep.load(), "needs_experts", False))


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
    names = parse_plugin_names(",".join(spec) if isinstance(spec, (list, tuple)) else spec)
    factories = available_plugins()
    for name in names:
        if name not in factories:
            raise PluginError(f"unknown plugin {name!r}; available: "
                              f"{', '.join(factories)} (or 'none')")
    return names


def plugins_need_experts(spec: str | list[str] | tuple[str, ...] | None) -> bool:
    """True when any named plugin declares ``needs_experts = True`` (a class attribute).

    Lets a run driver decide whether to load or train an expert pool without knowing plugins
    by name.
    """
    factories = available_plugins()
    return any(bool(getattr(factories[name], "needs_experts", False))
               for name in check_plugin_names(spec))


def _call_with_accepted(factory: Callable[..., Any], options: dict[str, Any]):
    """Call ``factory`` with the options its signature accepts (all of them if it has **kw)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return factory(**options)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return factory(**options)
    return factory(**{k: v for k, v in options.items() if k in params})


def make_plugin_manager() -> pluggy.PluginManager:
    """A pluggy manager for project ``dm_plugins`` with the hook specs loaded."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    return pm


class PluginSet:
    """The plugins of one run and the host-side rules for combining them.

    Typical glue inside a DM loop (see the README)::

        plugins = PluginSet.from_names("cap,ptm,plm", experts=pool)
        plugins.setup(DistillContext(num_classes=C, ipc=ipc, num_iterations=T,
                                     extractor=net, real=real_data))
        for t in range(T):
            if not plugins.update_extractor(net, t):
                reinitialise(net)                                    # plain DM
            ...                                                      # features
            mask = plugins.keep_mask(c, real_feat_c, syn_feat_c, t)  # per class, or None
            loss = loss + plugins.auxiliary_loss(syn_images, syn_labels, t)
        plugins.teardown()
    """

    def __init__(self, plugins: list[Any] | tuple[Any, ...] = ()):
        self.pm = make_plugin_manager()
        self.context: DistillContext | None = None
        self.names: list[str] = []
        for plugin in plugins:
            self.register(plugin)

    @classmethod
    def from_names(cls, spec: str | list[str] | tuple[str, ...] | None, **options) -> "PluginSet":
        """Build plugins by name (``"cap,ptm,plm"``, ``"ptm"``, ``"none"``).

        ``options`` are passed to each plugin's factory, each taking the ones it accepts
        (``experts``, ``alpha``, ``lam``, ``tau``, ...). An unknown name raises
        :class:`PluginError` listing the available names.
        """
        names = check_plugin_names(spec)
        factories = available_plugins()
        plugins = cls()
        for name in names:
            plugins.register(_call_with_accepted(factories[name], options), name=name)
        return plugins

    def register(self, plugin: Any, name: str | None = None) -> None:
        """Add a plugin object. Registering the same object or name twice is an error."""
        name = name or getattr(plugin, "name", None) or type(plugin).__name__
        if self.pm.is_registered(plugin):
            raise PluginError(f"plugin {name!r} is already registered; register it once")
        if self.pm.get_plugin(name) is not None:
            raise PluginError(f"a plugin named {name!r} is already registered; register it once")
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {name!r} does not match the dm_plugins hook specs: "
                              f"{exc}") from None
        self.names.append(name)

    def plugins(self) -> list[Any]:
        return [self.pm.get_plugin(n) for n in self.names]

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"PluginSet({', '.join(self.names) or 'none'})"

    # -- the calls a host makes -----------------------------------------------------------
    @property
    def num_iterations(self) -> int:
        if self.context is None:
            raise RuntimeError("PluginSet.setup(context) must be called before the loop")
        return self.context.num_iterations

    def setup(self, context: DistillContext | None = None, **fields) -> DistillContext:
        """Call ``dm_setup``. Pass a :class:`DistillContext` or its fields as keywords."""
        self.context = context if context is not None else DistillContext(**fields)
        self.pm.hook.dm_setup(context=self.context)
        return self.context

    def update_extractor(self, extractor: torch.nn.Module, iteration: int) -> bool:
        """Call ``dm_update_extractor``; True if any plugin set the weights (the host then
        skips its own random re-initialisation)."""
        results = self.pm.hook.dm_update_extractor(
            extractor=extractor, iteration=iteration, num_iterations=self.num_iterations)
        return any(bool(r) for r in results)

    @property
    def filters_real(self) -> bool:
        """True when some plugin implements ``dm_select_real`` (hosts may skip mask work)."""
        return bool(self.pm.hook.dm_select_real.get_hookimpls())

    def keep_mask(self, label: int, real_features: torch.Tensor, syn_features: torch.Tensor,
                  iteration: int) -> torch.Tensor | None:
        """Call ``dm_select_real`` and AND the masks; None when no plugin filters.

        An empty AND falls back to keeping everything (see the hook spec).
        """
        masks = self.pm.hook.dm_select_real(
            label=label, real_features=real_features, syn_features=syn_features,
            iteration=iteration, num_iterations=self.num_iterations)
        if not masks:
            return None
        keep = masks[0].bool()
        for m in masks[1:]:
            keep = keep & m.bool()
        if not bool(keep.any()):
            return torch.ones_like(keep)
        return keep

    def auxiliary_losses(self, syn_images: torch.Tensor, syn_labels: torch.Tensor,
                         iteration: int) -> dict[str, torch.Tensor]:
        """Each plugin's ``dm_auxiliary_loss`` by plugin name (plugins returning None omitted).

        Implementations are called one by one, in pluggy's order, so a host can log each
        plugin's part; the combination rule (a sum) is :meth:`auxiliary_loss`.
        """
        kwargs = {"syn_images": syn_images, "syn_labels": syn_labels, "iteration": iteration,
                  "num_iterations": self.num_iterations}
        parts = {}
        for impl in reversed(self.pm.hook.dm_auxiliary_loss.get_hookimpls()):
            out = impl.function(**{a: kwargs[a] for a in impl.argnames})
            if out is not None:
                parts[impl.plugin_name] = out
        return parts

    def auxiliary_loss(self, syn_images: torch.Tensor, syn_labels: torch.Tensor,
                       iteration: int) -> torch.Tensor | float:
        """Sum of the plugins' auxiliary losses (0.0 when none)."""
        parts = self.auxiliary_losses(syn_images, syn_labels, iteration)
        return sum(parts.values()) if parts else 0.0

    def teardown(self) -> None:
        """Call ``dm_teardown`` (safe to call more than once, or without setup)."""
        if self.context is not None:
            self.pm.hook.dm_teardown(context=self.context)
            self.context = None
