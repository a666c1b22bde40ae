"""What a method brings to the run driver: its :class:`MethodSpec` (name, defaults, presets,
capabilities and a ``build_host`` function) and the types around it.

A command line such as ``baselines/dm.py`` is one ``MethodSpec`` handed to
:func:`baselines.harness.driver.main`. ``build_host`` receives one :class:`HostRequest` and
returns a :class:`Host`; what the method can do (shard classes, store pixels, compile, need
experts, what it offers plugins) is declared on the spec, so the driver never probes the host.
"""
from __future__ import annotations

import argparse
import inspect
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

import torch

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from dm_plugins import ExpertPool, PluginSet
    from dm_plugins.distributed import ClassShard

    from .datasets import Dataset

EMBEDDED = "digits"
"""The dataset shipped with the code (offline); it gets :data:`EMBEDDED_BUDGET`."""

EMBEDDED_BUDGET: Mapping[str, Any] = {
    "iterations": 100, "batch_real": 64, "eval_runs": 1, "eval_epochs": 300,
    "num_experts": 2, "expert_epochs": 15,
}
"""A smaller budget on the embedded set, so a run takes minutes on a CPU ([embedded] in --help)."""

LAYERED = ("iterations", "plugins", "factor", "lr_img", "momentum", "batch_real",
           "num_experts", "expert_epochs", "eval_runs", "eval_epochs")
"""Shared hyperparameters whose default belongs to the method (or a preset): every
:attr:`MethodSpec.defaults` defines them all; on the command line their default is "resolve"."""


class Host(Protocol):
    """What the driver needs from a method's host (:class:`dm_plugins.DMHost` satisfies it):
    ``run(callback=fn, progress=bool)`` runs from ``iteration`` to the end calling ``fn(t,
    metrics)`` after each iteration and returns the stored synthetic images; ``state_dict`` /
    ``load_state_dict`` for checkpoints."""

    iteration: int

    def run(self, callback: Callable[[int, dict], None] | None = None,
            progress: bool = True) -> torch.Tensor: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class HostRequest:
    """Everything ``build_host`` gets to build a host.

    Attributes:
        dataset: the real data (in a class-sharded run only the shard's classes' training
            images, unless the spec ``needs_every_class``).
        network_factory: a fresh distillation network (``--arch``) per call.
        syn_init: the stored synthetic images: normalised, sorted by class, factorised when
            ``config["factor"] > 1``; in a sharded run only the shard's classes.
        plugins: the run's :class:`dm_plugins.PluginSet`.
        config: the resolved config (what config.json records).
        device: where the host computes.
        channels_last: whether networks use the channels-last memory format.
        experts: the expert pool, when the spec ``needs_experts`` (else None).
        shard: this process's classes in a run of several processes (else None).
    """

    dataset: "Dataset"
    network_factory: Callable[[], "nn.Module"]
    syn_init: torch.Tensor
    plugins: "PluginSet"
    config: Mapping[str, Any]
    device: torch.device
    channels_last: bool
    experts: "ExpertPool | None" = None
    shard: "ClassShard | None" = None


BuildHost = Callable[[HostRequest], Host]
"""``build_host(request)``; the host's ``run`` returns the stored images normalised, or in pixel
space when the spec says ``stores_pixels``."""


def call_build_host(build_host: Callable[..., Host], request: HostRequest) -> Host:
    """``build_host(request)``; a function of the older signature ``(dataset, network_factory,
    syn_init, plugins, config, device, channels_last, [experts=, shard=])`` still works, with a
    DeprecationWarning."""
    parameters = inspect.signature(build_host).parameters
    required = [p for p in parameters.values() if p.default is p.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(required) <= 1:
        return build_host(request)
    warnings.warn("build_host(dataset, network_factory, ...) is deprecated: take one "
                  "HostRequest (baselines.harness.spec)", DeprecationWarning, stacklevel=2)
    extra = {}
    if request.experts is not None or "experts" in parameters:
        extra["experts"] = request.experts
    if request.shard is not None:
        extra["shard"] = request.shard
    return build_host(request.dataset, request.network_factory, request.syn_init,
                      request.plugins, request.config, request.device, request.channels_last,
                      **extra)


@dataclass(frozen=True)
class Rule:
    """A default computed from the dataset and the other settings: ``fn(dataset, settings)``,
    where ``settings`` holds every value that is not itself a Rule, by argparse dest (``ipc``,
    ``factor``, ``no_dsa``, ...). ``text`` is how ``--help`` states it."""

    fn: Callable[["Dataset", dict], Any]
    text: str


@dataclass(frozen=True)
class Preset:
    """Named defaults that take precedence over the method's and the embedded budget's (the
    command line still wins). ``values`` maps setting names to constants or :class:`Rule`."""

    description: str
    values: Mapping[str, Any]


@dataclass(frozen=True)
class MethodSpec:
    """One distillation method's command line.

    Attributes:
        name: ``config["method"]``, the run-directory prefix, the synthetic set's ``method``,
            and the name of the preset that means "the method's own defaults".
        description: the ``--help`` description.
        defaults: the method's defaults (constants or :class:`Rule`); must define every name
            in :data:`LAYERED`, may define any other setting (its parser default then loses).
        build_host: see :data:`BuildHost`.
        add_arguments: ``fn(parser)`` adding the method's own arguments; their values land in
            config.json under their argparse ``dest`` (and in ``sources``).
        presets: extra presets by name (``--preset NAME``); the method's own name is always a
            preset too (no overrides), and the default.
        embedded_budget: defaults on the embedded dataset (below presets, above the method's).
        prog: the program name in ``--help`` (default ``baselines/<name>.py``).
        checks: the method's own settings' rules, config key -> a rule name of
            :data:`baselines.harness.validation.RULES` (``"positive"``, ``"nonnegative"``,
            ...), checked with the shared ones before anything is written.

    Capabilities (what the driver may ask of the method):
        needs_experts: the method itself uses the expert pool (DANCE): experts are loaded or
            trained for every run and passed as :attr:`HostRequest.experts`.
        shards_classes: the host can run class-sharded (``torchrun --nproc-per-node K``):
            it gets :attr:`HostRequest.shard`, ``syn_init`` holds only the shard's classes and
            ``dataset.train`` only their images. False: a launch of more than one process is
            refused before any work.
        needs_every_class: with ``shards_classes``, ``dataset.train`` keeps every class's
            images in every process (IDM: its model queue trains on all of them).
        stores_pixels: the host's ``run`` returns images in pixel space (DANCE), which the
            driver normalises before saving and evaluating.
        supports_compile: ``--compile`` is meaningful for the host; False refuses it before
            any work.
        offers: what the method's host gives plugins (:attr:`dm_plugins.DistillContext.offers`);
            plugin options that need more are refused before any work.
    """

    name: str
    description: str
    defaults: Mapping[str, Any]
    build_host: BuildHost
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    presets: Mapping[str, Preset] = field(default_factory=dict)
    embedded_budget: Mapping[str, Any] = field(default_factory=lambda: dict(EMBEDDED_BUDGET))
    prog: str | None = None
    checks: Mapping[str, str] = field(default_factory=dict)
    needs_experts: bool = False
    shards_classes: bool = False
    needs_every_class: bool = False
    stores_pixels: bool = False
    supports_compile: bool = True
    offers: frozenset = frozenset()

    def __post_init__(self):
        missing = [key for key in LAYERED if key not in self.defaults]
        if missing:
            raise ValueError(f"MethodSpec {self.name!r}: defaults miss {', '.join(missing)}")
        if self.name in self.presets:
            raise ValueError(f"MethodSpec {self.name!r}: a preset may not take the method's name")

    @property
    def preset_names(self) -> list[str]:
        return [self.name, *self.presets]

    @property
    def program(self) -> str:
        """How messages name the command line (``baselines/<name>.py`` unless ``prog``)."""
        return self.prog or f"baselines/{self.name}.py"
