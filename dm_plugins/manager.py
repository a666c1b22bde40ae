"""Building a set of plugins from names, and the facade loops call.

Contract: :class:`PluginSet` holds one run's plugins in a pluggy manager and is the only thing a
loop calls. Which plugins exist, and parsing and checking their names, is
:mod:`dm_plugins.registry` (its names are importable from here too).

Loops (the minimal host, the adapters, or a user's own DM/IDM/DANCE loop) talk to
:class:`PluginSet`, never to pluggy directly. Hooks are called through pluggy's own call loop;
the combination rules pluggy cannot express as markers live here: keep-masks ANDed, named
auxiliary losses merged and summed, at most one extractor provider.
"""
from __future__ import annotations

import sys
import warnings
from typing import Any, Callable, Union

import pluggy
import torch
from torch import nn

from . import hookspecs
from .context import DistillContext
from .errors import PluginError
from .options import RESOURCES, check_options, declared_options
# the registry's names, importable from here as before the registry had its own module
from .registry import (ENTRY_POINT_GROUP, _call_with_accepted, _check_names,  # noqa: F401
                       _LazyEntryPoint, available_plugins, builtin_plugins, check_plugin_names,
                       parse_plugin_names, plugins_need_experts)


class PastTheEnd(UserWarning):
    """A loop called the plugins at an iteration >= num_iterations (see
    :meth:`PluginSet.extractor`): warned once per run; the schedules are held at their end."""


class HookNeverCalled(UserWarning):
    """A plugin implements a per-iteration hook that the loop never called during a run (so the
    plugin did nothing): warned once, at :meth:`PluginSet.teardown`, naming the call to add."""


#: per-iteration hook -> the PluginSet call that reaches it (what the warning tells a loop to add)
_CALLS = {"dm_provide_extractor": "net = plugins.extractor(t, fallback=your_net) per iteration",
          "dm_select_real": "plugins.select_real(c, real_f, syn_f, t) per class (batched: "
                            "plugins.real_class_means)",
          "dm_feature_loss": "plugins.feature_loss(c, real_f, syn_f, t) per class (batched: "
                             "plugins.batched_feature_losses)",
          "dm_auxiliary_loss": "plugins.auxiliary_loss(syn_images, syn_labels, t)"}


def make_plugin_manager() -> pluggy.PluginManager:
    """A pluggy manager for project ``dm_plugins`` with the hook specs loaded."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    return pm


Fallback = Union[nn.Module, Callable[[], nn.Module], None]
"""What :meth:`PluginSet.extractor` uses when no plugin provides the network: the loop's own
network, or a zero-argument callable building it (called only when needed)."""


class PluginSet:
    """The plugins of one run and the loop-side rules for combining them.

    Glue inside a per-class DM loop (the README has a runnable version)::

        plugins = PluginSet.from_names("cap,ptm,plm", experts=pool)
        plugins.setup(num_classes=C, ipc=ipc, num_iterations=T, real=real_data)
        for t in range(T):
            net = plugins.extractor(t, fallback=build_random_net)     # ptm, else your own
            for c in range(C):
                ...                                                   # augment, features
                real_f = plugins.select_real(c, real_f, syn_f, t)     # cap
                loss_c = match(real_f, syn_f) + plugins.auxiliary_loss(syn_aug_c, labels_c, t)
        plugins.teardown()

    Every method validates its arguments and raises :class:`PluginError` with a one-line
    message. Iterations are numbered ``0 .. num_iterations - 1``; a negative or non-integer one
    is an error, one at or past ``num_iterations`` a :class:`PastTheEnd` warning (once), after
    which the hooks see ``t = T`` (every schedule at its end) instead of an error that would
    lose a long run's result.
    """

    def __init__(self, plugins: list[Any] | tuple[Any, ...] = ()):
        self._warned_past_end = False
        self._called: set[str] = set()   # the hooks of _CALLS the loop reached this run
        self._ran = False                # whether the loop made any per-iteration call
        self.pm = make_plugin_manager()
        self.context: DistillContext | None = None
        self.names: list[str] = []
        for plugin in plugins:
            self.register(plugin)

    @classmethod
    def from_names(cls, spec: str | list[str] | tuple[str, ...] | None,
                   options: dict[str, dict[str, Any]] | None = None, **resources) -> "PluginSet":
        """Build plugins by name (``"cap,ptm,plm"``, ``"ptm"``, ``"none"``).

        ``options`` maps a plugin name to its own options (``{"cap": {"end": 0.5}}``), checked
        against what the plugin declares (:mod:`dm_plugins.options`); a plugin never receives
        another plugin's options. ``resources`` (``experts``, ``compile``) go to every factory
        that accepts them. An unknown name raises :class:`PluginError` listing the available
        names.

        Deprecated (kept for one release, with a ``DeprecationWarning``): a plugin option passed
        as a flat keyword (``alpha=7``) goes to the named plugins that declare an option of
        that name; any other keyword is passed as a resource.
        """
        # the names are checked against the table the plugins are built from: both read this
        # module's ``available_plugins`` (so patching ``dm_plugins.manager.available_plugins``
        # still reaches from_names)
        names = _check_names(spec, available_plugins)
        factories = available_plugins()
        options = dict(options or {})
        for name in options:
            if name not in names:
                raise PluginError(f"options given for plugin {name!r}, which is not among "
                                  f"{', '.join(names) or 'none'}")
        flat = {k: v for k, v in resources.items() if k not in RESOURCES}
        owners = {k: [n for n in names if k in {o.name for o in declared_options(factories[n])}]
                  for k in flat}
        for key, owned_by in owners.items():
            if owned_by:
                warnings.warn(f"PluginSet.from_names({key}=...) is deprecated: pass "
                              f"options={{{owned_by[0]!r}: {{{key!r}: ...}}}}",
                              DeprecationWarning, stacklevel=2)
                for n in owned_by:
                    options.setdefault(n, {}).setdefault(key, flat[key])
                resources.pop(key)
        plugins = cls()
        for name in names:
            own = check_options(name, factories[name], options.get(name, {}))
            plugins.register(_call_with_accepted(factories[name], {**resources, **own},
                                                 required=own), name=name)
        return plugins

    def register(self, plugin: Any, name: str | None = None) -> None:
        """Add a plugin object.

        Registering the same object or name twice, or a second plugin that provides the
        extractor, is a :class:`PluginError`.
        """
        name = name or getattr(plugin, "name", None) or type(plugin).__name__
        if self.pm.is_registered(plugin):
            raise PluginError(f"plugin {name!r} is already registered; register it once")
        if self.pm.get_plugin(name) is not None:
            raise PluginError(f"a plugin named {name!r} is already registered; register it once")
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            detail = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
            raise PluginError(f"plugin {name!r} does not match the dm_plugins hook specs: "
                              f"{detail}") from None
        providers = [impl.plugin_name for impl in self.pm.hook.dm_provide_extractor.get_hookimpls()]
        if len(providers) > 1:
            self.pm.unregister(plugin)
            other = next(p for p in providers if p != name)
            raise PluginError(f"plugins {other!r} and {name!r} both provide the feature "
                              f"extractor; at most one plugin may (use one of them)")
        self.names.append(name)

    def plugins(self) -> list[Any]:
        return [self.pm.get_plugin(n) for n in self.names]

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"PluginSet({', '.join(self.names) or 'none'})"

    @property
    def provides_extractor(self) -> bool:
        """True when a registered plugin implements ``dm_provide_extractor``."""
        return bool(self.pm.hook.dm_provide_extractor.get_hookimpls())

    @property
    def filters_real(self) -> bool:
        """True when some plugin implements ``dm_select_real`` (loops may skip mask work)."""
        return bool(self.pm.hook.dm_select_real.get_hookimpls())

    @property
    def uses_feature_loss(self) -> bool:
        """True when some plugin implements ``dm_feature_loss`` (a loop that never holds a
        class's real features at once, such as :class:`~dm_plugins.DMHost`'s fused sums, then
        keeps them)."""
        return bool(self.pm.hook.dm_feature_loss.get_hookimpls())

    @property
    def separate_step_lr(self) -> float | None:
        """The learning rate of the separate image step a plugin asks for (attribute
        ``separate_step_lr`` of a plugin, e.g. ``plm --plm-step separate``), or None when every
        auxiliary loss belongs in the host's own step. A host offering ``"separate_step"`` runs
        the auxiliary losses there with an SGD optimiser of its own at this rate."""
        rates = {getattr(p, "separate_step_lr", None) for p in self.plugins()} - {None}
        if len(rates) > 1:
            raise PluginError(f"plugins ask for separate image steps at different learning "
                              f"rates ({', '.join(map(str, sorted(rates)))}); use one rate")
        return next(iter(rates), None)

    def needs(self, offer: str) -> bool:
        """True when some plugin asks the host for ``offer`` (a plugin's ``host_needs``; see
        :attr:`DistillContext.offers`): a host computes what it passes only when asked."""
        return any(offer in getattr(p, "host_needs", ()) for p in self.plugins())

    @property
    def adds_losses(self) -> bool:
        """True when some plugin implements ``dm_auxiliary_loss`` (a host whose own auxiliary
        step the plugins replace, e.g. DANCE's inter-class step, asks this)."""
        return bool(self.pm.hook.dm_auxiliary_loss.get_hookimpls())

    # -- the calls a loop makes ----------------------------------------------------------
    @property
    def num_iterations(self) -> int:
        if self.context is None:
            raise PluginError("PluginSet.setup(...) must be called before the loop")
        return self.context.num_iterations

    def _check_iteration(self, iteration: int) -> int:
        """``iteration`` as the hooks get it. Not an integer >= 0: a :class:`PluginError`
        (a mistake a loop shows on its first call). At or past ``num_iterations``: a warning,
        once per run, and the hooks get ``T`` (the schedule held at its end, progress 1), so a
        loop that runs one iteration more than it said (the original DM code runs
        ``Iteration + 1``) never loses its result to bookkeeping at the very end."""
        T = self.num_iterations
        if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
            raise PluginError(
                f"iteration {iteration!r} is outside 0..{T - 1} (num_iterations={T}); number "
                f"iterations from 0 and set num_iterations to how many your loop runs")
        self._ran = True
        if iteration >= T:
            if not self._warned_past_end:
                warnings.warn(f"iteration {iteration} is past num_iterations={T}; the plugins' "
                              f"schedules stay at their end (t = T) from here on. Set "
                              f"num_iterations to how many iterations your loop runs",
                              PastTheEnd, stacklevel=3)
                self._warned_past_end = True
            return T
        return iteration

    def setup(self, context: DistillContext | None = None, **fields) -> DistillContext:
        """Call ``dm_setup``. Pass a :class:`DistillContext` or its fields as keywords."""
        if context is not None and fields:
            raise PluginError("pass PluginSet.setup either a DistillContext or its fields, not both")
        self.context = context if context is not None else DistillContext(**fields)
        self._warned_past_end, self._called, self._ran = False, set(), False
        _ = self.separate_step_lr  # two plugins asking for different step rates: refused here
        self.pm.hook.dm_setup(context=self.context)
        return self.context

    def extractor(self, iteration: int, fallback: Fallback = None) -> nn.Module:
        """The feature extractor for iteration t: the providing plugin's network, else
        ``fallback`` (the loop's own network, or a callable building it, called only then).
        """
        t = self._check_iteration(iteration)
        self._called.add("dm_provide_extractor")
        net = self.pm.hook.dm_provide_extractor(iteration=t, num_iterations=self.num_iterations)
        if net is not None:
            return net
        if isinstance(fallback, nn.Module):
            return fallback
        if fallback is None:
            raise PluginError("no plugin provides the extractor this iteration and no fallback "
                              "was given: pass fallback=your_network (or a function building it)")
        return fallback()

    def keep_mask(self, label: int, real_features: torch.Tensor, syn_features: torch.Tensor,
                  iteration: int) -> torch.Tensor:
        """Call ``dm_select_real`` for one class and AND the masks: a (B,) bool mask, all True
        when no plugin filters. An empty AND keeps everything (see the hook spec)."""
        t = self._check_iteration(iteration)
        _check_features(real_features, syn_features)
        self._called.add("dm_select_real")
        masks = self.pm.hook.dm_select_real(
            label=int(label), real_features=real_features, syn_features=syn_features,
            iteration=t, num_iterations=self.num_iterations)
        keep = torch.ones(real_features.shape[0], dtype=torch.bool, device=real_features.device)
        for m in masks:
            keep = keep & m.to(keep.device).bool()
        if masks and not bool(keep.any()):
            keep = torch.ones_like(keep)
        return keep

    def select_real(self, label: int, real_features: torch.Tensor, syn_features: torch.Tensor,
                    iteration: int) -> torch.Tensor:
        """The real features of class ``label`` to match: the rows :meth:`keep_mask` keeps
        (``real_features`` itself when no plugin filters)."""
        if not self.filters_real:
            self._check_iteration(iteration)
            return real_features
        return real_features[self.keep_mask(label, real_features, syn_features, iteration)]

    def batched_keep_mask(self, real_features: torch.Tensor, real_labels: torch.Tensor,
                          syn_features: torch.Tensor, syn_labels: torch.Tensor,
                          iteration: int) -> torch.Tensor:
        """:meth:`keep_mask` for a batch holding every class: a (B,) bool mask over
        ``real_features``, each class's rows decided against that class's synthetic rows."""
        keep = torch.ones_like(real_labels, dtype=torch.bool)
        if not self.filters_real:
            self._check_iteration(iteration)
            return keep
        for c in torch.unique(real_labels).tolist():
            rows = (real_labels == c).nonzero(as_tuple=True)[0]
            keep[rows] = self.keep_mask(c, real_features[rows], syn_features[syn_labels == c],
                                        iteration).to(keep.device)
        return keep

    def real_class_means(self, real_features: torch.Tensor, real_labels: torch.Tensor,
                         syn_features: torch.Tensor, syn_labels: torch.Tensor, iteration: int,
                         num_classes: int) -> torch.Tensor:
        """(num_classes, D) mean real feature of each class over the samples the plugins keep,
        for a loop that batches every class in one forward (the original DM code's BatchNorm
        branch). With no filtering plugin it is exactly that code's
        ``real_features.reshape(num_classes, -1, D).mean(1)`` (rows sorted by class, equal
        counts), so the graft changes nothing; otherwise class c's row is the mean of its rows
        :meth:`batched_keep_mask` keeps, as the per-class loop computes it."""
        if real_features.ndim != 2:
            raise PluginError(f"features must be (batch, dim), got {tuple(real_features.shape)}")
        counts = torch.bincount(real_labels, minlength=num_classes)
        ordered = bool((real_labels[1:] >= real_labels[:-1]).all()) if len(real_labels) else True
        if not self.filters_real and ordered and bool((counts == counts[0]).all()):
            self._check_iteration(iteration)
            return real_features.reshape(num_classes, -1, real_features.shape[1]).mean(1)
        keep = self.batched_keep_mask(real_features, real_labels, syn_features, syn_labels,
                                      iteration)
        rows = []
        for c in range(num_classes):
            mine = real_features[keep & (real_labels == c)]
            rows.append(mine.mean(0) if mine.shape[0] else real_features.new_zeros(
                real_features.shape[1]))
        return torch.stack(rows)

    def auxiliary_losses(self, syn_images: torch.Tensor, syn_labels: torch.Tensor,
                         iteration: int, extractor: nn.Module | None = None,
                         real_images: torch.Tensor | None = None,
                         real_labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The plugins' ``dm_auxiliary_loss`` results merged into one dict of named losses.
        ``extractor`` and ``real_images`` / ``real_labels``: what the host offers (see the
        hook spec); None otherwise."""
        t = self._check_iteration(iteration)
        if syn_images.shape[0] != syn_labels.shape[0]:
            raise PluginError(f"{syn_images.shape[0]} synthetic images but {syn_labels.shape[0]} "
                              f"labels")
        if (real_images is None) != (real_labels is None) or (
                real_images is not None and real_images.shape[0] != real_labels.shape[0]):
            raise PluginError("pass real_images and real_labels together, one label per image")
        self._called.add("dm_auxiliary_loss")
        return _merge(self.pm.hook.dm_auxiliary_loss(
            syn_images=syn_images, syn_labels=syn_labels, iteration=t,
            num_iterations=self.num_iterations, extractor=extractor,
            real_images=real_images, real_labels=real_labels), "dm_auxiliary_loss")

    def feature_losses(self, label: int, real_features: torch.Tensor,
                       syn_features: torch.Tensor, iteration: int) -> dict[str, torch.Tensor]:
        """The plugins' ``dm_feature_loss`` results for class ``label``, merged into one dict of
        named losses (empty when no plugin implements the hook)."""
        t = self._check_iteration(iteration)
        self._called.add("dm_feature_loss")
        if not self.uses_feature_loss:
            return {}
        _check_features(real_features, syn_features)
        return _merge(self.pm.hook.dm_feature_loss(
            label=int(label), real_features=real_features, syn_features=syn_features,
            iteration=t, num_iterations=self.num_iterations), "dm_feature_loss")

    def feature_loss(self, label: int, real_features: torch.Tensor, syn_features: torch.Tensor,
                     iteration: int) -> torch.Tensor | float:
        """Sum of :meth:`feature_losses` (0.0 when none): the one line a per-class loop adds
        after its matching loss."""
        parts = self.feature_losses(label, real_features, syn_features, iteration)
        return sum(parts.values()) if parts else 0.0

    def batched_feature_losses(self, real_features: torch.Tensor, real_labels: torch.Tensor,
                               syn_features: torch.Tensor, syn_labels: torch.Tensor,
                               iteration: int) -> dict[str, torch.Tensor]:
        """:meth:`feature_losses` for a loop that batches every class in one forward (the
        original DM code's BatchNorm branch): called per class present in ``syn_labels``, in
        class order, on that class's rows, the real rows being those :meth:`batched_keep_mask`
        keeps; each name summed over classes. It asks the filters again (``dm_select_real``
        is a pure function of its arguments for ``cap``, so a graft that also calls
        :meth:`real_class_means` gets the same rows twice, at the cost of one more mask)."""
        t = self._check_iteration(iteration)
        if not self.uses_feature_loss:
            return {}
        keep = self.batched_keep_mask(real_features, real_labels, syn_features, syn_labels, t)
        totals: dict[str, torch.Tensor] = {}
        for c in torch.unique(syn_labels).tolist():
            real_rows = real_features[keep & (real_labels == c)]
            for name, loss in self.feature_losses(c, real_rows, syn_features[syn_labels == c],
                                                  t).items():
                totals[name] = totals[name] + loss if name in totals else loss
        return totals

    def auxiliary_loss(self, syn_images: torch.Tensor, syn_labels: torch.Tensor,
                       iteration: int, **offered) -> torch.Tensor | float:
        """Sum of the plugins' auxiliary losses (0.0 when none); ``offered`` as in
        :meth:`auxiliary_losses`."""
        parts = self.auxiliary_losses(syn_images, syn_labels, iteration, **offered)
        return sum(parts.values()) if parts else 0.0

    def teardown(self) -> None:
        """Call ``dm_teardown`` (safe to call more than once, or without setup).

        After a run whose loop made per-iteration calls, plugins whose per-iteration hook it
        never reached (``cap`` with no :meth:`select_real`, ``plm`` with no
        :meth:`auxiliary_loss`: they did nothing) get one :class:`HookNeverCalled` warning
        naming the calls to add; none after a run with no such call (resumed at its end) or
        while an exception propagates (a run stopped by an error)."""
        if self.context is not None:
            if self._ran and sys.exc_info()[1] is None:
                missing = [f"plugin {impl.plugin_name!r} implements {hook} but the loop never "
                           f"called it: add {call}" for hook, call in _CALLS.items()
                           if hook not in self._called
                           for impl in getattr(self.pm.hook, hook).get_hookimpls()]
                if missing:
                    warnings.warn("; ".join(missing) + " (docs/graft.md, Checking a graft)",
                                  HookNeverCalled, stacklevel=2)
            self.pm.hook.dm_teardown(context=self.context)
            self.context = None


def _merge(results: list, hook: str) -> dict[str, torch.Tensor]:
    """The dicts of named losses ``hook``'s implementations returned, merged (None results
    skipped); a result that is not a dict, or a name returned twice, is a PluginError."""
    merged: dict[str, torch.Tensor] = {}
    for result in results:
        if not isinstance(result, dict):
            raise PluginError(f"{hook} must return a dict of named losses or None, got "
                              f"{type(result).__name__}")
        for name, loss in result.items():
            if name in merged:
                raise PluginError(f"two plugins return a loss named {name!r} ({hook})")
            merged[name] = loss
    return merged


def _check_features(real_features: torch.Tensor, syn_features: torch.Tensor) -> None:
    if real_features.ndim != 2 or syn_features.ndim != 2:
        raise PluginError(f"features must be (batch, dim) tensors, got real "
                          f"{tuple(real_features.shape)} and synthetic {tuple(syn_features.shape)};"
                          f" flatten them first")
    if real_features.shape[1] != syn_features.shape[1]:
        raise PluginError(f"real features have {real_features.shape[1]} dimensions but "
                          f"synthetic features {syn_features.shape[1]}")
    if real_features.shape[0] == 0:
        raise PluginError("a class's real batch is empty: there is nothing to match")
