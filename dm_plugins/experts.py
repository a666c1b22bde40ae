"""The expert pool shared by pseudo-trajectory matching and pseudo-label matching.

An expert is a network trained on the real data, stored with the random initial weights it
started from (theta_init) and its trained weights (theta_star) (PTLM section 3; see
``docs/methods.md#pseudo-trajectory-matching``). The pool keeps every expert's weights in memory
and answers "which expert does iteration t use?" with a deterministic function of (seed, t), so
PTM and PLM pick the same expert without knowing about each other.

Getting experts is one call, :meth:`ExpertPool.load_or_train`: it loads what a directory holds
and trains (and saves, one expert at a time) what is missing, from plain tensors.

Every network the pool builds comes from the caller's factory inside
:func:`dm_plugins.seeding.preserved_global_rng`: a factory that reseeds the global RNG (research
code often seeds from the wall clock) neither changes the caller's RNG stream nor the experts'
initial weights, which are re-drawn from a seed derived from (seed, k).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .atomic import atomic_torch_save, atomic_write_json
from .errors import ExpertError
from .heartbeat import Heartbeat
from .seeding import derive_seed, make_generator, preserved_global_rng, reinitialize_
from .training import accuracy, train_classifier
from .wrapping import strip_wrapper_prefixes, unwrap_network

MANIFEST = "manifest.json"
FORMAT = "dm_plugins.experts"

_PICK_STREAM = 0xE7
_INIT_STREAM = 0x1A
_TRAIN_STREAM = 0x7A


@dataclass
class Expert:
    """One expert: full state dicts at initialisation and after training, plus metadata.

    State-dict keys are stored without wrapper prefixes (``module.``, ``_orig_mod.``).
    """

    init_state: dict[str, torch.Tensor]
    trained_state: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.init_state = strip_wrapper_prefixes(self.init_state)
        self.trained_state = strip_wrapper_prefixes(self.trained_state)


def _state_on_cpu(module: nn.Module) -> dict[str, torch.Tensor]:
    """A contiguous CPU copy of the (unwrapped) network's state."""
    state = unwrap_network(module).state_dict()
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def build_network(network_factory: Callable[[], nn.Module]) -> nn.Module:
    """``network_factory()`` unwrapped, with every global RNG restored afterwards."""
    with preserved_global_rng():
        network = network_factory()
    if not isinstance(network, nn.Module):
        raise ExpertError(f"the network factory returned {type(network).__name__}, not an "
                          f"nn.Module")
    return unwrap_network(network)


def describe_training(network_factory: Callable[[], nn.Module], images: torch.Tensor,
                      labels: torch.Tensor) -> dict:
    """What a pool's manifest records for a reader besides its recipe and ``meta``: the
    network's class and parameter count and the training data's shape (dataset and
    architecture names come from ``meta`` when the caller gives them)."""
    network = build_network(network_factory)
    return {"network": type(network).__name__,
            "parameters": int(sum(p.numel() for p in network.parameters())),
            "train_images": int(images.shape[0]), "image_shape": list(images.shape[1:]),
            "num_classes": int(labels.max()) + 1 if len(labels) else 0}


def factory_device(network_factory: Callable[[], nn.Module]) -> torch.device:
    """Where ``network_factory`` builds its networks (the device of its first parameter; the
    CPU for a network without parameters): experts train there unless told otherwise."""
    with preserved_global_rng():
        network = network_factory()
    first = next(iter(network.parameters()), None)
    return torch.device("cpu") if first is None else first.device


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in state.items()}


class ExpertPool:
    """N experts held in memory, with a deterministic per-iteration pick.

    Args:
        experts: the experts (at least one).
        network_factory: ``() -> nn.Module`` building the experts' architecture (wrapped
            networks are unwrapped); used to check compatibility with a loop's network and to
            build the networks PTM and PLM compute with.
        seed: the pick seed: :meth:`pick` is a function of ``(seed, t)`` only.
        meta: free-form description (dataset, architecture, the training recipe, ...), saved
            in the manifest.
    """

    def __init__(self, experts: Sequence[Expert], network_factory: Callable[[], nn.Module],
                 seed: int = 0, meta: dict | None = None):
        if len(experts) == 0:
            raise ExpertError("an expert pool needs at least one expert")
        self.experts = list(experts)
        self.network_factory = network_factory
        self.seed = int(seed)
        self.meta = dict(meta or {})
        template = build_network(network_factory)
        self._state_shapes = _shapes(template.state_dict())
        self._param_names = [n for n, _ in template.named_parameters()]
        self._param_cache: dict[tuple[int, str], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._network_cache: dict[tuple[int, str, str], nn.Module] = {}
        self._check_states_fit()

    def __len__(self) -> int:
        return len(self.experts)

    # -- the shared pick ------------------------------------------------------------------
    def pick(self, iteration: int) -> int:
        """Index of the expert used at iteration t: a fixed function of (seed, t)."""
        return derive_seed(self.seed, _PICK_STREAM, iteration) % len(self.experts)

    # -- networks and weights in memory ---------------------------------------------------
    def network(self, device: str | torch.device = "cpu",
                memory_format: torch.memory_format = torch.contiguous_format) -> nn.Module:
        """A new network of the experts' architecture (weights unspecified), in training mode
        with parameter gradients off: the network an extractor provider owns and rewrites."""
        net = build_network(self.network_factory)
        return net.to(device, memory_format=memory_format).train().requires_grad_(False)

    def parameter_pair(self, index: int, device: str | torch.device = "cpu"
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(theta_init, theta_star) of expert ``index`` as lists of parameter tensors.

        Ordered like ``named_parameters()`` of the pool's architecture (buffers such as
        batch-norm statistics are not included). Cached per device: later calls cost nothing.
        """
        key = (index, str(torch.device(device)))
        if key not in self._param_cache:
            expert = self.experts[index]
            init = [expert.init_state[n].to(device).contiguous() for n in self._param_names]
            star = [expert.trained_state[n].to(device).contiguous() for n in self._param_names]
            self._param_cache[key] = (init, star)
        return self._param_cache[key]

    def trained_network(self, index: int, device: str | torch.device = "cpu",
                        memory_format: torch.memory_format = torch.contiguous_format
                        ) -> nn.Module:
        """Expert ``index`` with its trained weights, frozen (eval mode, no parameter grads).

        Built once per (expert, device, memory format) and kept in memory.
        """
        key = (index, str(torch.device(device)), str(memory_format))
        if key not in self._network_cache:
            net = build_network(self.network_factory)
            net.load_state_dict(self.experts[index].trained_state)
            net.to(device, memory_format=memory_format).eval().requires_grad_(False)
            self._network_cache[key] = net
        return self._network_cache[key]

    def check_compatible(self, network: nn.Module) -> None:
        """Raise :class:`ExpertError` unless ``network``'s parameters (wrappers removed) match
        the experts'."""
        expected = {n: self._state_shapes[n] for n in self._param_names}
        got = {n: tuple(p.shape) for n, p in unwrap_network(network).named_parameters()}
        if expected != got:
            diff = sorted(set(expected.items()) ^ set(got.items()))[:2]
            raise ExpertError(
                f"the experts ({self.describe()}) do not fit this network: parameter names/shapes "
                f"differ (e.g. {diff}); use experts trained for this architecture and class count")

    def describe(self) -> str:
        keys = ("dataset", "arch", "num_classes", "epochs")
        parts = [f"{k}={self.meta[k]}" for k in keys if k in self.meta]
        return ", ".join(parts) if parts else f"{len(self)} experts"

    def _check_states_fit(self) -> None:
        for i, e in enumerate(self.experts):
            for which, state in (("initial", e.init_state), ("trained", e.trained_state)):
                got = _shapes(state)
                if got != self._state_shapes:
                    diff = sorted(set(self._state_shapes.items()) ^ set(got.items()))[:2]
                    missing = sorted(set(self._state_shapes) - set(got))[:1]
                    hint = (f"parameter {missing[0]!r} is missing" if missing and not
                            set(got) - set(self._state_shapes) else
                            "another architecture or class count")
                    raise ExpertError(
                        f"expert {i}'s {which} weights ({self.describe()}) do not fit the "
                        f"network factory's (differences e.g. {diff}: {hint}); use experts "
                        f"trained for this network, or delete the directory to retrain")

    # -- persistence ----------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``expert_<k>.pt`` files and ``manifest.json`` (each atomically)."""
        directory = Path(directory)
        for k in range(len(self)):
            self._save_expert(directory, k)
        self._write_manifest(directory)
        return directory

    def _save_expert(self, directory: Path, k: int) -> None:
        _write_expert(directory, k, self.experts[k])

    def _write_manifest(self, directory: Path) -> None:
        manifest = {"format": FORMAT, "version": 1, "num_experts": len(self), "seed": self.seed,
                    "meta": self.meta, "experts": [e.meta for e in self.experts]}
        described = getattr(self, "described", None)
        if described:  # for a reader, never compared on load (``meta`` is)
            manifest["described"] = described
        atomic_write_json(directory / MANIFEST, manifest)

    @classmethod
    def load(cls, directory: str | os.PathLike, network_factory: Callable[[], nn.Module],
             seed: int = 0, expect: dict | None = None) -> "ExpertPool":
        """Load a pool written by :meth:`save` or :meth:`load_or_train`.

        Args:
            expect: metadata the pool must have (e.g. ``{"arch": "convnet", "num_classes": 10}``);
                a mismatch is an :class:`ExpertError` naming both values.
        """
        directory = Path(directory)
        manifest = _read_manifest(directory)
        if manifest is None:
            raise ExpertError(f"no expert pool at {directory} (missing {MANIFEST}); train experts "
                              f"first (ExpertPool.load_or_train) or point to a directory written "
                              f"by ExpertPool.save")
        _check_expected(directory, manifest.get("meta", {}), expect)
        experts = [_load_expert(directory, k) for k in range(int(manifest.get("num_experts", 0)))]
        if not experts:
            raise ExpertError(f"{directory} holds no trained expert yet")
        return cls(experts, network_factory, seed=seed, meta=manifest.get("meta", {}))

    # -- training -------------------------------------------------------------------------
    @classmethod
    def load_or_train(cls, directory: str | os.PathLike, network_factory: Callable[[], nn.Module],
                      images: torch.Tensor, labels: torch.Tensor, *, num_experts: int = 5,
                      epochs: int = 70, seed: int = 0, lr: float = 0.01, momentum: float = 0.9,
                      weight_decay: float = 5e-4, batch_size: int = 256,
                      lr_milestones: Sequence[int] = (), lr_gamma: float = 0.1,
                      cutmix_p: float = 0.0,
                      augment: Callable | None = None, augment_name: str | None = None,
                      test_images: torch.Tensor | None = None,
                      test_labels: torch.Tensor | None = None,
                      device: str | torch.device | None = None, progress: bool = True,
                      meta: dict | None = None, channels_last: bool = False,
                      log: Callable[[str], None] | None = None, rank: int = 0,
                      world_size: int = 1) -> "ExpertPool":
        """The experts in ``directory``, training and saving the missing ones first.

        Each expert is saved as soon as it is trained, so an interrupted call resumes at the
        first missing expert; expert k depends only on (seed, k) and the recipe, so training
        them in one call or several gives the same weights. A directory trained with another
        recipe or ``meta`` (dataset, architecture, ...) raises :class:`ExpertError`; so does a
        non-empty directory that is not an expert pool. Extra experts in the directory are
        left on disk and not used.

        Training (PTLM's recipe by default: SGD lr 0.01, momentum 0.9, weight decay 5e-4,
        70 epochs, batch 256) uses **no augmentation unless** ``augment(x, generator) -> x`` is
        given; name it with ``augment_name`` (recorded in the manifest and compared on load).
        The command-line baselines pass DANCE's recipe by default (IDC's per-image colour and
        crop, CutMix, ``augment_name="idc-color-crop"``; ``--expert-recipe ptlm`` is per-image
        DSA). It runs on ``device``, by default where ``network_factory`` builds its networks
        (:func:`factory_device`: a factory of CUDA networks trains on the GPU).
        ``lr_milestones`` (epochs where the lr is multiplied by ``lr_gamma``) and ``cutmix_p``
        (CutMix probability per batch) give schedules such as DANCE's; all of it is recorded.

        Args:
            images, labels: normalised real training data (plain tensors).
            test_images, test_labels: when given, each expert's test accuracy is recorded.
            meta: extra description that must match on reuse (e.g. dataset, arch).
            log: called with one line per expert loaded or trained.
            rank, world_size: this process's place in a run of several processes
            (``torchrun``; every process calls this with the same arguments, and a process
            group of ``world_size`` processes must be running). The missing experts are dealt
            round-robin: process ``rank`` trains expert k when ``k % world_size == rank`` (each
            seeded by (seed, k) as always, so the pool equals one trained in one process) and
            saves it atomically; then every process waits for the others and loads the whole
            pool, and process 0 writes the manifest. An error in one process (e.g. a directory
            of another recipe) is raised there, and :class:`dm_plugins.distributed.PeerFailed`
            in the others. Unlike one process, which records each expert in the manifest as it
            is saved, an interrupted run of several processes records none of that call's
            experts (the next call trains them again, to the same weights).
        """
        if num_experts < 1:
            raise ExpertError(f"num_experts must be >= 1, got {num_experts}")
        device = factory_device(network_factory) if device is None else device
        if world_size > 1:
            return cls._load_or_train_spread(
                directory, network_factory, images, labels, rank=rank, world_size=world_size,
                log=log, num_experts=num_experts, epochs=epochs, seed=seed, lr=lr,
                momentum=momentum, weight_decay=weight_decay, batch_size=batch_size,
                lr_milestones=lr_milestones, lr_gamma=lr_gamma, cutmix_p=cutmix_p,
                augment=augment, augment_name=augment_name, test_images=test_images,
                test_labels=test_labels, device=device, progress=progress, meta=meta,
                channels_last=channels_last)
        directory = Path(directory)
        pool_meta, manifest, experts = _cached_experts(directory, num_experts, _recipe(
            epochs, seed, lr, momentum, weight_decay, batch_size, augment, augment_name,
            lr_milestones, lr_gamma, cutmix_p), meta, log)
        if len(experts) < num_experts and log is not None:
            log(f"experts: training {num_experts - len(experts)} of {num_experts} for {epochs} "
                f"epochs (saved to {directory} one by one)")
        pool = None
        train = partial(train_expert, network_factory, images, labels, epochs=epochs, seed=seed,
                        lr=lr, momentum=momentum, weight_decay=weight_decay,
                        batch_size=batch_size, lr_milestones=lr_milestones, lr_gamma=lr_gamma,
                        cutmix_p=cutmix_p, augment=augment, test_images=test_images,
                        test_labels=test_labels, device=device, progress=progress,
                        channels_last=channels_last)
        described = describe_training(network_factory, images, labels)
        for k in range(len(experts), num_experts):
            on_epoch = None
            if log is not None and not progress:  # no bar: a line every tenth of the epochs
                beat = Heartbeat(log, f"experts: expert {k + 1}/{num_experts}, epoch", epochs,
                                 every=max(1, epochs // 10), unit="epoch")
                on_epoch = (lambda e, loss, acc, beat=beat:
                            beat(e, loss=round(loss, 4), train_accuracy=round(acc, 1)))
            experts.append(train(index=k, desc=f"expert {k + 1}/{num_experts}",
                                 on_epoch=on_epoch))
            pool = cls(experts, network_factory, seed=seed, meta=pool_meta)
            pool.described = described
            pool._check_distinct_inits()
            directory.mkdir(parents=True, exist_ok=True)
            pool._save_expert(directory, k)
            pool._write_manifest(directory)
            if log is not None:
                log(f"experts: expert {k} trained, {_accuracy_text(experts[k])}")
        if pool is None:
            pool = cls(experts, network_factory, seed=seed,
                       meta={**(manifest or {}).get("meta", {}), **pool_meta})
        return pool

    @classmethod
    def _load_or_train_spread(cls, directory, network_factory, images, labels, *, rank: int,
                              world_size: int, log, num_experts: int, epochs: int, seed: int,
                              meta, **settings) -> "ExpertPool":
        """:meth:`load_or_train` by ``world_size`` processes (see its ``rank``)."""
        from . import distributed
        if not distributed.active(world_size):
            raise ExpertError(f"training experts with world_size={world_size} needs a running "
                              f"process group of {world_size} processes (torchrun); without "
                              f"one, leave rank and world_size at 0 and 1")
        directory = Path(directory)
        recipe = _recipe(epochs, seed, settings["lr"], settings["momentum"],
                         settings["weight_decay"], settings["batch_size"], settings["augment"],
                         settings.pop("augment_name"), settings["lr_milestones"],
                         settings["lr_gamma"], settings["cutmix_p"])

        def train_mine():
            pool_meta, manifest, cached = _cached_experts(directory, num_experts, recipe, meta,
                                                          log)
            missing = list(range(len(cached), num_experts))
            if missing and log is not None:
                log(f"experts: training {len(missing)} of {num_experts} for {epochs} epochs, "
                    f"dealt over {world_size} processes (expert k by process k % "
                    f"{world_size}; saved to {directory})")
            for k in (k for k in missing if k % world_size == rank):
                expert = train_expert(network_factory, images, labels, index=k, epochs=epochs,
                                      seed=seed, desc=f"expert {k + 1}/{num_experts}",
                                      **settings)
                directory.mkdir(parents=True, exist_ok=True)
                _write_expert(directory, k, expert)
            return pool_meta, manifest, missing

        pool_meta, manifest, missing = distributed.together(train_mine)
        experts = [_load_expert(directory, k) for k in range(num_experts)]
        pool = cls(experts, network_factory, seed=seed,
                   meta=pool_meta if missing else {**(manifest or {}).get("meta", {}),
                                                   **pool_meta})
        if missing:
            pool._check_distinct_inits()
            distributed.together(lambda: rank == 0 and pool._write_manifest(directory))
            for k in missing:
                if log is not None:
                    log(f"experts: expert {k} trained by process {k % world_size}, "
                        f"{_accuracy_text(experts[k])}")
        return pool

    @classmethod
    def train(cls, network_factory: Callable[[], nn.Module], images: torch.Tensor,
              labels: torch.Tensor, *, num_experts: int = 5, epochs: int = 70, seed: int = 0,
              lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4,
              batch_size: int = 256, lr_milestones: Sequence[int] = (), lr_gamma: float = 0.1,
              cutmix_p: float = 0.0, augment: Callable | None = None,
              test_images: torch.Tensor | None = None, test_labels: torch.Tensor | None = None,
              device: str | torch.device | None = None, progress: bool = True,
              meta: dict | None = None, channels_last: bool = False) -> "ExpertPool":
        """Train ``num_experts`` experts in memory (nothing saved; see :meth:`load_or_train`
        for the cached, resumable version). Same recipe, seeds and augmentation rule."""
        if num_experts < 1:
            raise ExpertError(f"num_experts must be >= 1, got {num_experts}")
        device = factory_device(network_factory) if device is None else device
        experts = [train_expert(network_factory, images, labels, index=k, epochs=epochs,
                                seed=seed, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                batch_size=batch_size, lr_milestones=lr_milestones,
                                lr_gamma=lr_gamma, cutmix_p=cutmix_p, augment=augment,
                                test_images=test_images,
                                test_labels=test_labels, device=device, progress=progress,
                                channels_last=channels_last, desc=f"expert {k + 1}/{num_experts}")
                   for k in range(num_experts)]
        pool_meta = {**_recipe(epochs, seed, lr, momentum, weight_decay, batch_size, augment,
                               None, lr_milestones, lr_gamma, cutmix_p), **(meta or {})}
        pool = cls(experts, network_factory, seed=seed, meta=pool_meta)
        pool._check_distinct_inits()
        return pool

    def _check_distinct_inits(self) -> None:
        """Experts must start from different weights (a factory whose parameters are not
        re-drawn by ``reset_parameters()`` and that reseeds the RNG would collapse them)."""
        first = {}
        for k, e in enumerate(self.experts):
            key = tuple(float(t.double().sum()) for t in e.init_state.values()
                        if t.is_floating_point())
            if key in first and all(torch.equal(a, b) for a, b in zip(
                    self.experts[first[key]].init_state.values(), e.init_state.values())):
                raise ExpertError(
                    f"experts {first[key]} and {k} start from identical weights: the network "
                    f"factory fixes its own initialisation; give its modules reset_parameters() "
                    f"or stop it reseeding the RNG")
            first.setdefault(key, k)

    def mean_test_accuracy(self) -> float:
        accs = [e.meta["test_accuracy"] for e in self.experts if "test_accuracy" in e.meta]
        return sum(accs) / len(accs) if accs else math.nan


def train_expert(network_factory: Callable[[], nn.Module], images: torch.Tensor,
                 labels: torch.Tensor, *, index: int, epochs: int, seed: int = 0,
                 lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4,
                 batch_size: int = 256, lr_milestones: Sequence[int] = (),
                 lr_gamma: float = 0.1, cutmix_p: float = 0.0, augment: Callable | None = None,
                 test_images: torch.Tensor | None = None, test_labels: torch.Tensor | None = None,
                 device: str | torch.device = "cpu", progress: bool = True,
                 channels_last: bool = False, desc: str = "expert",
                 on_epoch: Callable[[int, float, float], None] | None = None) -> Expert:
    """Train expert ``index``: initial weights drawn by each module's ``reset_parameters()``
    under a seed derived from (seed, index), batches and augmentation from a generator derived
    from (seed, index). Depends on nothing else, so experts can be trained one at a time."""
    net = build_network(network_factory)
    reinitialize_(net, derive_seed(seed, _INIT_STREAM, index))
    init_state = _state_on_cpu(net)
    net.to(device)
    train_acc = train_classifier(
        net, images, labels, epochs=epochs, lr=lr, momentum=momentum,
        weight_decay=weight_decay, batch_size=batch_size, lr_milestones=lr_milestones,
        lr_gamma=lr_gamma, cutmix_p=cutmix_p, augment=augment,
        generator=make_generator(seed, _TRAIN_STREAM, index), device=device, progress=progress,
        desc=desc, channels_last=channels_last, on_epoch=on_epoch)
    meta = {"index": index, "epochs": epochs, "train_accuracy": train_acc}
    if test_images is not None and test_labels is not None:
        meta["test_accuracy"] = accuracy(net, test_images, test_labels, device)
    return Expert(init_state, _state_on_cpu(net), meta)


def _recipe(epochs, seed, lr, momentum, weight_decay, batch_size, augment,
            augment_name: str | None = None, lr_milestones: Sequence[int] = (),
            lr_gamma: float = 0.1, cutmix_p: float = 0.0) -> dict:
    """How experts were trained, as recorded in a pool's metadata and compared on reuse.

    The schedule keys (``lr_milestones``, ``lr_gamma``, ``cutmix_p``) are recorded only when a
    schedule or CutMix is used, so pools saved before they existed compare equal to the
    constant-lr recipe they were trained with."""
    if augment is not None and augment_name is None:
        augment_name = getattr(augment, "__qualname__", type(augment).__name__)
    recipe = {"epochs": int(epochs), "seed": int(seed), "lr": lr, "momentum": momentum,
              "weight_decay": weight_decay, "batch_size": int(batch_size),
              "augment": augment_name or "none"}
    if list(lr_milestones):
        recipe.update(lr_milestones=[int(m) for m in lr_milestones], lr_gamma=lr_gamma)
    if cutmix_p:
        recipe["cutmix_p"] = cutmix_p
    return recipe


def _write_expert(directory: Path, k: int, e: Expert) -> None:
    """Expert ``e`` as ``directory/expert_<k>.pt``, atomically."""
    atomic_torch_save(directory / f"expert_{k}.pt",
                      {"format": FORMAT, "init": e.init_state, "trained": e.trained_state,
                       "meta": e.meta})


def _cached_experts(directory: Path, num_experts: int, recipe: dict, meta: dict | None, log
                    ) -> tuple[dict, dict | None, list[Expert]]:
    """The pool's metadata (``recipe`` and ``meta``), the manifest of ``directory`` (None when
    it has none) and the first of its ``num_experts`` experts that it records. An
    :class:`ExpertError` for a directory of another recipe or meta, or a non-empty directory
    that is not an expert pool."""
    directory = Path(directory)
    pool_meta = {**recipe, **(meta or {})}
    manifest = _read_manifest(directory)
    if manifest is None and directory.exists() and any(directory.iterdir()):
        if not all(p.name.startswith(".") or p.name.startswith("expert_")
                   for p in directory.iterdir()):
            raise ExpertError(f"{directory} exists but holds no expert pool (no {MANIFEST}); "
                              f"point to an empty or new directory")
    experts: list[Expert] = []
    if manifest is not None:
        _check_expected(directory, _with_schedule_defaults(manifest.get("meta", {})),
                        _with_schedule_defaults(pool_meta))
        have = min(int(manifest.get("num_experts", 0)), num_experts)
        experts = [_load_expert(directory, k) for k in range(have)]
        if log is not None and experts:
            log(f"experts: loaded {len(experts)} from {directory}")
    return pool_meta, manifest, experts


def _accuracy_text(expert: Expert) -> str:
    acc = expert.meta.get("test_accuracy")
    return (f"test accuracy {acc:.1f}%" if acc is not None else
            f"train accuracy {expert.meta.get('train_accuracy', math.nan):.1f}%")


def _read_manifest(directory: Path) -> dict | None:
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ExpertError(f"{path} is not readable JSON ({exc}); delete the directory to "
                          f"retrain the experts") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExpertError(f"{path} is not a dm_plugins expert manifest")
    return manifest


_SCHEDULE_DEFAULTS = {"lr_milestones": [], "lr_gamma": 0.1, "cutmix_p": 0.0}
"""Recipe keys :func:`_recipe` leaves out at these values."""


def _with_schedule_defaults(recipe: dict) -> dict:
    return {**_SCHEDULE_DEFAULTS, **recipe}


def _check_expected(directory: Path, meta: dict, expect: dict | None) -> None:
    for key, value in (expect or {}).items():
        if key in meta and meta[key] != value:
            raise ExpertError(f"the experts in {directory} were trained with {key}={meta[key]!r} "
                              f"but {key}={value!r} is asked for; use a matching directory or "
                              f"another one")


def _load_expert(directory: Path, k: int) -> Expert:
    path = directory / f"expert_{k}.pt"
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        expert = Expert(blob["init"], blob["trained"], dict(blob.get("meta", {})))
    except FileNotFoundError:
        raise ExpertError(f"expert file {path} is missing; delete {directory} to retrain the "
                          f"experts") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ExpertError(f"expert file {path} is unreadable (truncated or corrupt? "
                          f"{type(exc).__name__}); delete {directory} to retrain") from None
    expert.meta["index"] = k
    return expert
