"""The expert pool shared by pseudo-trajectory matching and pseudo-label matching.

An expert is a network trained on the real data, stored with the random initial weights it
started from (theta_init) and its trained weights (theta_star) (PTLM section 3, DESIGN.md 2.5).
The pool keeps every expert's weights in memory and answers "which expert does iteration t
use?" with a deterministic function of (seed, t), so PTM and PLM pick the same expert without
knowing about each other.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .atomic import atomic_torch_save, atomic_write_json
from .errors import ExpertError
from .seeding import derive_seed, make_generator
from .training import accuracy, train_classifier

MANIFEST = "manifest.json"
FORMAT = "dm_plugins.experts"

_PICK_STREAM = 0xE7
_INIT_STREAM = 0x1A
_TRAIN_STREAM = 0x7A


@dataclass
class Expert:
    """One expert: full state dicts at initialisation and after training, plus metadata."""

    init_state: dict[str, torch.Tensor]
    trained_state: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)


def _state_on_cpu(module: nn.Module) -> dict[str, torch.Tensor]:
    """A contiguous CPU copy of the state (whatever memory format the network trained in)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


class ExpertPool:
    """N experts held in memory, with a deterministic per-iteration pick.

    Args:
        experts: the experts (at least one).
        network_factory: ``() -> nn.Module`` building the experts' architecture; used to
            check compatibility with a host's extractor and to build the frozen trained networks.
        seed: the pick seed: :meth:`pick` is a function of ``(seed, t)`` only.
        meta: free-form description (dataset, architecture, epochs, ...), saved in the manifest.
    """

    def __init__(self, experts: Sequence[Expert], network_factory: Callable[[], nn.Module],
                 seed: int = 0, meta: dict | None = None):
        if len(experts) == 0:
            raise ExpertError("an expert pool needs at least one expert")
        self.experts = list(experts)
        self.network_factory = network_factory
        self.seed = int(seed)
        self.meta = dict(meta or {})
        self._param_cache: dict[tuple[int, str], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._network_cache: dict[tuple[int, str, str], nn.Module] = {}
        self._check_states_fit(network_factory())

    def __len__(self) -> int:
        return len(self.experts)

    # -- the shared pick ------------------------------------------------------------------
    def pick(self, iteration: int) -> int:
        """Index of the expert used at iteration t: a fixed function of (seed, t)."""
        return derive_seed(self.seed, _PICK_STREAM, iteration) % len(self.experts)

    # -- weights in memory ----------------------------------------------------------------
    def parameter_pair(self, index: int, device: str | torch.device = "cpu"
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(theta_init, theta_star) of expert ``index`` as lists of parameter tensors.

        Ordered like ``network.named_parameters()`` of the pool's architecture (buffers such as
        batch-norm statistics are not included). Cached per device: later calls cost nothing.
        """
        key = (index, str(torch.device(device)))
        if key not in self._param_cache:
            names = [n for n, _ in self.network_factory().named_parameters()]
            expert = self.experts[index]
            init = [expert.init_state[n].to(device).contiguous() for n in names]
            star = [expert.trained_state[n].to(device).contiguous() for n in names]
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
            net = self.network_factory()
            net.load_state_dict(self.experts[index].trained_state)
            net.to(device, memory_format=memory_format).eval().requires_grad_(False)
            self._network_cache[key] = net
        return self._network_cache[key]

    def check_compatible(self, network: nn.Module) -> None:
        """Raise :class:`ExpertError` unless ``network``'s parameters match the experts'."""
        expected = {n: tuple(p.shape) for n, p in self.network_factory().named_parameters()}
        got = {n: tuple(p.shape) for n, p in network.named_parameters()}
        if expected != got:
            diff = sorted(set(expected.items()) ^ set(got.items()))[:2]
            raise ExpertError(
                f"the experts ({self.describe()}) do not fit this network: parameter names/shapes "
                f"differ (e.g. {diff}); use experts trained for this architecture and class count")

    def describe(self) -> str:
        keys = ("dataset", "arch", "num_classes", "epochs")
        parts = [f"{k}={self.meta[k]}" for k in keys if k in self.meta]
        return ", ".join(parts) if parts else f"{len(self)} experts"

    def _check_states_fit(self, network: nn.Module) -> None:
        expected = {n: tuple(t.shape) for n, t in network.state_dict().items()}
        for i, e in enumerate(self.experts):
            for which, state in (("initial", e.init_state), ("trained", e.trained_state)):
                got = {n: tuple(t.shape) for n, t in state.items()}
                if got != expected:
                    diff = sorted(set(expected.items()) ^ set(got.items()))[:2]
                    raise ExpertError(
                        f"expert {i}'s {which} weights ({self.describe()}) do not fit the "
                        f"requested network (differences e.g. {diff}): other architecture or "
                        f"class count; point to matching experts or delete the cache to retrain")

    # -- persistence ----------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``manifest.json`` and ``expert_<k>.pt`` files (each atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for k, e in enumerate(self.experts):
            atomic_torch_save(directory / f"expert_{k}.pt",
                              {"format": FORMAT, "init": e.init_state,
                               "trained": e.trained_state, "meta": e.meta})
        manifest = {"format": FORMAT, "version": 1, "num_experts": len(self), "seed": self.seed,
                    "meta": self.meta, "experts": [e.meta for e in self.experts]}
        atomic_write_json(directory / MANIFEST, manifest)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, network_factory: Callable[[], nn.Module],
             seed: int = 0, expect: dict | None = None) -> "ExpertPool":
        """Load a pool written by :meth:`save`.

        Args:
            expect: metadata the pool must have (e.g. ``{"arch": "convnet", "num_classes": 10}``);
                a mismatch is an :class:`ExpertError` naming both values.
        """
        directory = Path(directory)
        manifest_path = directory / MANIFEST
        if not manifest_path.is_file():
            raise ExpertError(f"no expert pool at {directory} (missing {MANIFEST}); train experts "
                              f"first or point to a directory written by ExpertPool.save")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise ExpertError(f"{manifest_path} is not readable JSON ({exc}); delete the directory "
                              f"to retrain the experts") from None
        if manifest.get("format") != FORMAT:
            raise ExpertError(f"{manifest_path} is not a dm_plugins expert manifest")
        meta = manifest.get("meta", {})
        for key, value in (expect or {}).items():
            if key in meta and meta[key] != value:
                raise ExpertError(
                    f"expert cache {directory} was trained with {key}={meta[key]!r} but this run "
                    f"uses {key}={value!r}; use a matching --experts directory or another cache")
        experts = []
        for k in range(int(manifest.get("num_experts", 0))):
            path = directory / f"expert_{k}.pt"
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                experts.append(Expert(blob["init"], blob["trained"], blob.get("meta", {})))
            except FileNotFoundError:
                raise ExpertError(f"expert file {path} is missing; delete {directory} to "
                                  f"retrain the experts") from None
            except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
                raise ExpertError(f"expert file {path} is unreadable (truncated or corrupt? "
                                  f"{type(exc).__name__}); delete {directory} to retrain") from None
        return cls(experts, network_factory, seed=seed, meta=meta)

    # -- training -------------------------------------------------------------------------
    @classmethod
    def train(cls, network_factory: Callable[[], nn.Module], images: torch.Tensor,
              labels: torch.Tensor, *, num_experts: int = 5, epochs: int = 70, seed: int = 0,
              lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4,
              batch_size: int = 256, augment: Callable | None = None,
              test_images: torch.Tensor | None = None, test_labels: torch.Tensor | None = None,
              device: str | torch.device = "cpu", progress: bool = True,
              meta: dict | None = None, channels_last: bool = False) -> "ExpertPool":
        """Train ``num_experts`` experts on real data (PTLM settings: SGD lr 0.01, momentum 0.9,
        weight decay 5e-4, 70 epochs by default).

        Expert k's initial weights are drawn with a seed derived from (seed, k), saved, then the
        network is trained with batches drawn from a generator derived from (seed, k).

        Args:
            images, labels: normalised real training data.
            augment: optional ``augment(x, generator) -> x`` applied to every training batch
                (e.g. per-image DSA).
            test_images, test_labels: when given, each expert's test accuracy is recorded in its
                metadata.
            channels_last: train in channels-last memory format (faster on CPU).
        """
        if num_experts < 1:
            raise ExpertError(f"num_experts must be >= 1, got {num_experts}")
        experts = []
        for k in range(num_experts):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(seed, _INIT_STREAM, k))
                net = network_factory()
            init_state = _state_on_cpu(net)
            net.to(device)
            generator = make_generator(seed, _TRAIN_STREAM, k)
            train_acc = train_classifier(
                net, images, labels, epochs=epochs, lr=lr, momentum=momentum,
                weight_decay=weight_decay, batch_size=batch_size, augment=augment,
                generator=generator, device=device, progress=progress,
                desc=f"expert {k + 1}/{num_experts}", channels_last=channels_last)
            expert_meta = {"index": k, "epochs": epochs, "train_accuracy": train_acc}
            if test_images is not None and test_labels is not None:
                expert_meta["test_accuracy"] = accuracy(net, test_images, test_labels, device)
            experts.append(Expert(init_state, _state_on_cpu(net), expert_meta))
        pool_meta = {"epochs": epochs, "seed": seed, "lr": lr, "momentum": momentum,
                     "weight_decay": weight_decay, "batch_size": batch_size, **(meta or {})}
        return cls(experts, network_factory, seed=seed, meta=pool_meta)

    def mean_test_accuracy(self) -> float:
        accs = [e.meta["test_accuracy"] for e in self.experts if "test_accuracy" in e.meta]
        return sum(accs) / len(accs) if accs else math.nan
