"""IDM's model queue (``docs/methods.md#idm-and-dance``): the FIFO of randomly initialised,
progressively trained networks that :class:`baselines.methods.idm.IDM` matches through and whose
running accuracy weights its class-aware term.

Net number ``serial`` (0, 1, 2, ... in push order) is initialised from a seed derived from the run
seed and its serial number, so a queue rebuilt from :meth:`ModelQueue.state_dict` (every net's
weights, optimiser state and meter) equals the one saved. What trains the nets and when is the
host's (:meth:`baselines.methods.idm.IDM.train_queue`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from dm_plugins.experts import build_network
from dm_plugins.seeding import derive_seed, reinitialize_


__all__ = ["ModelQueue", "QueueNet"]

_QUEUE_STREAM = 0x1D0   # a queue net's initial weights, by its serial number


@dataclass
class QueueNet:
    """One model of the queue: its network, its SGD optimiser and its accuracy meter."""

    serial: int
    net: nn.Module
    optimizer: torch.optim.SGD
    correct: int = 0
    seen: int = 0

    @property
    def accuracy(self) -> float:
        """Running training accuracy in percent since the last reset; 0 before any sample
        (the reference's ``ClassErrorMeter(accuracy=True).value()[0]``, 0 when ``n == 0``)."""
        return 100.0 * self.correct / self.seen if self.seen else 0.0

    def reset_meter(self) -> None:
        self.correct = self.seen = 0


class ModelQueue:
    """IDM's FIFO queue of randomly initialised, progressively trained networks.

    Net number ``serial`` (0, 1, 2, ... in push order) is drawn from a seed derived from
    ``(seed, serial)``. Parameters have ``requires_grad`` off except while the net trains, so
    matching never builds gradients for them.
    """

    def __init__(self, network_factory: Callable[[], nn.Module], *, capacity: int, initial: int,
                 seed: int, device: torch.device, memory_format: torch.memory_format,
                 lr: float, momentum: float, weight_decay: float):
        self.network_factory = network_factory
        self.capacity = int(capacity)
        self.seed = int(seed)
        self.device = device
        self.memory_format = memory_format
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.nets: list[QueueNet] = []
        self.next_serial = 0
        for _ in range(initial):
            self.push()

    def _build(self, serial: int, weights: dict | None = None) -> QueueNet:
        net = build_network(self.network_factory).to(self.device, memory_format=self.memory_format)
        if weights is None:
            reinitialize_(net, derive_seed(self.seed, _QUEUE_STREAM, serial))
        else:
            net.load_state_dict(weights)
        net.train().requires_grad_(False)
        optimizer = torch.optim.SGD(net.parameters(), lr=self.lr, momentum=self.momentum,
                                    weight_decay=self.weight_decay)
        return QueueNet(serial, net, optimizer)

    def push(self) -> QueueNet:
        """Append a new random net, first evicting the oldest while ``capacity`` are held."""
        while len(self.nets) >= self.capacity:
            self.nets.pop(0)
        entry = self._build(self.next_serial)
        self.next_serial += 1
        self.nets.append(entry)
        return entry

    def reset_meters(self) -> None:
        for entry in self.nets:
            entry.reset_meter()

    @property
    def serials(self) -> list[int]:
        return [entry.serial for entry in self.nets]

    def __len__(self) -> int:
        return len(self.nets)

    def __getitem__(self, index: int) -> QueueNet:
        return self.nets[index]

    def __iter__(self):
        return iter(self.nets)

    def state_dict(self) -> dict:
        """Every net's weights and optimiser state and meter, copied to the CPU."""
        return {"next_serial": self.next_serial, "nets": [
            {"serial": e.serial, "correct": e.correct, "seen": e.seen,
             "weights": {k: v.detach().cpu().clone() for k, v in e.net.state_dict().items()},
             "optimizer": _to_cpu(copy.deepcopy(e.optimizer.state_dict()))}
            for e in self.nets]}

    def load_state_dict(self, state: dict) -> None:
        self.nets = []
        for item in state["nets"]:
            entry = self._build(int(item["serial"]), item["weights"])
            entry.optimizer.load_state_dict(item["optimizer"])
            entry.correct, entry.seen = int(item["correct"]), int(item["seen"])
            self.nets.append(entry)
        self.next_serial = int(state["next_serial"])


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj
