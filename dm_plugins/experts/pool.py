"""The expert pool in memory: :class:`Expert` and :class:`ExpertPool`.

Contract:

* An :class:`Expert` holds full state dicts at initialisation (theta_init) and after training
  (theta_star), keys without wrapper prefixes, plus free-form metadata.
* :meth:`ExpertPool.pick` is a fixed function of (seed, t): PTM and PLM pick the same expert at
  iteration t without knowing about each other, and resumed runs pick as uninterrupted ones.
* Every network the pool builds comes from the caller's factory through :func:`build_network`,
  inside :func:`dm_plugins.seeding.preserved_global_rng` (a factory that reseeds the global RNG
  changes neither the caller's RNG stream nor the experts).
* Parameter pairs and frozen trained networks are built once per device (and memory format)
  and kept in memory.
* The files (:meth:`ExpertPool.save`, :meth:`ExpertPool.load`) are ``storage``'s; training
  (:meth:`ExpertPool.train`, :meth:`ExpertPool.load_or_train`) is ``training``'s. Both import
  this module, so the methods here import them when called.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import ExpertError
from ..seeding import derive_seed, preserved_global_rng
from ..wrapping import strip_wrapper_prefixes, unwrap_network
from .recipe import ExpertRecipe, recipe_from

_PICK_STREAM = 0xE7


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


def build_network(network_factory: Callable[[], nn.Module]) -> nn.Module:
    """``network_factory()`` unwrapped, with every global RNG restored afterwards."""
    with preserved_global_rng():
        network = network_factory()
    if not isinstance(network, nn.Module):
        raise ExpertError(f"the network factory returned {type(network).__name__}, not an "
                          f"nn.Module")
    return unwrap_network(network)


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

    Attributes set by training (None otherwise), written to the manifest by :meth:`save`:
    ``recipe`` (the :class:`~dm_plugins.experts.ExpertRecipe`, recorded as its hash) and
    ``described`` (the network and data, for a reader).
    """

    def __init__(self, experts: Sequence[Expert], network_factory: Callable[[], nn.Module],
                 seed: int = 0, meta: dict | None = None):
        if len(experts) == 0:
            raise ExpertError("an expert pool needs at least one expert")
        self.experts = list(experts)
        self.network_factory = network_factory
        self.seed = int(seed)
        self.meta = dict(meta or {})
        self.recipe: ExpertRecipe | None = None
        self.described: dict | None = None
        template = build_network(network_factory)
        self._state_shapes = _shapes(template.state_dict())
        self._param_names = [n for n, _ in template.named_parameters()]
        state = template.state_dict()   # persistent buffers only (running statistics, counters)
        buffers = [n for n, _ in template.named_buffers() if n in state]
        self._float_buffer_names = [n for n in buffers if state[n].is_floating_point()]
        self._other_buffer_names = [n for n in buffers if not state[n].is_floating_point()]
        self._param_cache: dict[tuple[int, str], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._buffer_cache: dict[tuple[int, str], tuple[list[torch.Tensor], ...]] = {}
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
        batch-norm statistics are :meth:`buffer_triple`'s). Cached per device: later calls cost
        nothing.
        """
        key = (index, str(torch.device(device)))
        if key not in self._param_cache:
            expert = self.experts[index]
            init = [expert.init_state[n].to(device).contiguous() for n in self._param_names]
            star = [expert.trained_state[n].to(device).contiguous() for n in self._param_names]
            self._param_cache[key] = (init, star)
        return self._param_cache[key]

    def buffer_triple(self, index: int, device: str | torch.device = "cpu"
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Expert ``index``'s persistent buffers, ordered like ``named_buffers()`` of the pool's
        architecture: (floating-point ones at init, the same trained, the others trained), e.g.
        batch norm's running mean and variance, and its ``num_batches_tracked``. All three are
        empty for a network without buffers (instance or group norm). Cached per device."""
        key = (index, str(torch.device(device)))
        if key not in self._buffer_cache:
            expert = self.experts[index]
            self._buffer_cache[key] = tuple(
                [state[n].to(device).contiguous() for n in names] for state, names in (
                    (expert.init_state, self._float_buffer_names),
                    (expert.trained_state, self._float_buffer_names),
                    (expert.trained_state, self._other_buffer_names)))
        return self._buffer_cache[key]

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

    # -- persistence (storage.py) ---------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``expert_<k>.pt`` files and ``manifest.json`` (each atomically)."""
        directory = Path(directory)
        for k in range(len(self)):
            self._save_expert(directory, k)
        self._write_manifest(directory)
        return directory

    def _save_expert(self, directory: Path, k: int) -> None:
        from .storage import write_expert
        write_expert(directory, k, self.experts[k])

    def _write_manifest(self, directory: Path) -> None:
        from .storage import write_manifest
        write_manifest(directory, self)

    @classmethod
    def load(cls, directory: str | os.PathLike, network_factory: Callable[[], nn.Module],
             seed: int = 0, expect: dict | None = None) -> "ExpertPool":
        """Load a pool written by :meth:`save` or :meth:`load_or_train`.

        Args:
            expect: metadata the pool must have (e.g. ``{"arch": "convnet", "num_classes": 10}``);
                a mismatch is an :class:`ExpertError` naming both values.
        """
        from .storage import load_pool
        return load_pool(cls, directory, network_factory, seed=seed, expect=expect)

    # -- training (training.py) -----------------------------------------------------------
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
                      world_size: int = 1, recipe: ExpertRecipe | None = None) -> "ExpertPool":
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
            recipe: every training setting as one :class:`~dm_plugins.experts.ExpertRecipe`,
                instead of ``epochs`` ... ``augment_name`` (leave those at their defaults).
                Its settings are recorded in the manifest's ``meta`` and its hash as
                ``recipe_hash``; a pool whose recorded hash differs is refused like one whose
                recorded settings differ (manifests without a hash compare settings only).
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
        from .training import load_or_train_pool
        recipe = recipe_from(recipe, epochs=epochs, seed=seed, lr=lr, momentum=momentum,
                             weight_decay=weight_decay, batch_size=batch_size,
                             lr_milestones=lr_milestones, lr_gamma=lr_gamma, cutmix_p=cutmix_p,
                             augment=augment, augment_name=augment_name)
        return load_or_train_pool(
            cls, directory, network_factory, images, labels, recipe, num_experts=num_experts,
            test_images=test_images, test_labels=test_labels, device=device, progress=progress,
            meta=meta, channels_last=channels_last, log=log, rank=rank, world_size=world_size)

    @classmethod
    def train(cls, network_factory: Callable[[], nn.Module], images: torch.Tensor,
              labels: torch.Tensor, *, num_experts: int = 5, epochs: int = 70, seed: int = 0,
              lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4,
              batch_size: int = 256, lr_milestones: Sequence[int] = (), lr_gamma: float = 0.1,
              cutmix_p: float = 0.0, augment: Callable | None = None,
              test_images: torch.Tensor | None = None, test_labels: torch.Tensor | None = None,
              device: str | torch.device | None = None, progress: bool = True,
              meta: dict | None = None, channels_last: bool = False,
              recipe: ExpertRecipe | None = None) -> "ExpertPool":
        """Train ``num_experts`` experts in memory (nothing saved; see :meth:`load_or_train`
        for the cached, resumable version). Same recipe, seeds and augmentation rule; the
        settings come as keywords or as one ``recipe``."""
        from .training import train_pool
        recipe = recipe_from(recipe, epochs=epochs, seed=seed, lr=lr, momentum=momentum,
                             weight_decay=weight_decay, batch_size=batch_size,
                             lr_milestones=lr_milestones, lr_gamma=lr_gamma, cutmix_p=cutmix_p,
                             augment=augment)
        return train_pool(cls, network_factory, images, labels, recipe, num_experts=num_experts,
                          test_images=test_images, test_labels=test_labels, device=device,
                          progress=progress, meta=meta, channels_last=channels_last)
