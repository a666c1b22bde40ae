"""Tiny networks and data shared by the tests (seconds each, offline)."""
from __future__ import annotations

import contextlib
import functools
import io

import pytest
import torch
from torch import nn

from dm_plugins import ClassIndexedTensors, ExpertPool


class TinyNet(nn.Module):
    """A two-block ConvNet in miniature (conv - instance norm - relu - avgpool) with ``embed``."""

    def __init__(self, channels: int = 1, num_classes: int = 3, width: int = 4, size: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(width, width), nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(width, width), nn.ReLU(),
            nn.AvgPool2d(2))
        self.classifier = nn.Linear(width * (size // 4) ** 2, num_classes)

    def embed(self, x):
        return self.features(x).flatten(1)

    def forward(self, x):
        return self.classifier(self.embed(x))


def make_toy(num_classes: int = 3, per_class: int = 12, channels: int = 1, size: int = 8,
             seed: int = 0) -> ClassIndexedTensors:
    """Separable toy images: class c has a bright square in quadrant c, plus noise."""
    g = torch.Generator().manual_seed(seed)
    images = 0.3 * torch.randn(num_classes * per_class, channels, size, size, generator=g)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    h = size // 2
    for i, c in enumerate(labels.tolist()):
        r, q = divmod(c % 4, 2)
        images[i, :, r * h:(r + 1) * h, q * h:(q + 1) * h] += 2.0
    return ClassIndexedTensors(images, labels, num_classes)


def group_scale_augment(x, groups, generator, num_groups=None):
    """A Siamese test augmentation: one random scale per group id (draws depend only on G, or
    on ``num_groups`` when given, as the host's augmentation contract asks)."""
    num_groups = int(groups.max()) + 1 if num_groups is None else int(num_groups)
    scales = 0.5 + torch.rand(num_groups, generator=generator)
    return x * scales.to(x)[groups].view(-1, 1, 1, 1)


@pytest.fixture(scope="session")
def toy():
    return make_toy()


@pytest.fixture(scope="session")
def tiny_factory():
    return lambda: TinyNet(channels=1, num_classes=3, width=4, size=8)


@pytest.fixture(scope="session")
def pool(toy, tiny_factory):
    return ExpertPool.train(tiny_factory, toy.images, toy.labels, num_experts=2, epochs=6,
                            seed=0, batch_size=16, lr=0.05, progress=False,
                            meta={"arch": "tiny", "num_classes": 3, "dataset": "toy"})


def random_stand_in_experts(dataset, arch, *, num_experts, seed, **_):
    """What ``load_or_train_experts`` returns, made of random networks (seeded, no training)."""
    from baselines.harness.networks import get_network
    from dm_plugins import Expert, ExpertPool
    from dm_plugins.experts import build_network
    from dm_plugins.seeding import reinitialize_

    def factory():
        return get_network(arch, dataset.channels, dataset.num_classes, dataset.image_size)
    states = [{n: v.clone() for n, v in reinitialize_(build_network(factory), s)
               .state_dict().items()} for s in range(2 * num_experts)]
    experts = [Expert(states[2 * k], states[2 * k + 1], {"note": "random stand-in"})
               for k in range(num_experts)]
    return ExpertPool(experts, factory, seed=seed), None


@pytest.fixture()
def random_experts(monkeypatch):
    """Random stand-ins for trained experts: the CLI's wiring does not depend on how well the
    experts were trained, and training them would dominate the test's time."""
    from baselines.harness import expert_cache
    monkeypatch.setattr(expert_cache, "load_or_train_experts", random_stand_in_experts)


def count_calls(monkeypatch, cls, method: str, calls: dict, key: str) -> None:
    """Patch ``cls.method`` (for the test) so each call adds 1 to ``calls[key]``."""
    orig = getattr(cls, method)

    @functools.wraps(orig)
    def wrapper(self, *args, **kwargs):
        calls[key] += 1
        return orig(self, *args, **kwargs)
    monkeypatch.setattr(cls, method, wrapper)


@pytest.fixture()
def hook_calls(monkeypatch):
    """How often each built-in plugin's hook runs during the test, by plugin name."""
    from dm_plugins import CapacityMatching, PseudoLabelMatching, PseudoTrajectoryMatching
    hooks = {"cap": (CapacityMatching, "dm_select_real"),
             "ptm": (PseudoTrajectoryMatching, "dm_provide_extractor"),
             "plm": (PseudoLabelMatching, "dm_auxiliary_loss")}
    calls = {name: 0 for name in hooks}
    for name, (cls, method) in hooks.items():
        count_calls(monkeypatch, cls, method, calls, name)
    return calls


@contextlib.contextmanager
def killed_at(host_cls, iteration: int):
    """While active, ``host_cls.step`` raises KeyboardInterrupt on reaching ``iteration``: a run
    killed mid-way, for resume tests."""
    real = host_cls.step

    def step(self, t=None):
        if (self.iteration if t is None else t) == iteration:
            raise KeyboardInterrupt
        return real(self, t)
    host_cls.step = step
    try:
        yield
    finally:
        host_cls.step = real


def straight_and_resumed(make_host, at: int = 2):
    """Two runs of ``make_host()``: one uninterrupted, one stopped after ``at`` iterations, its
    ``state_dict`` saved (then one more step taken, which must not leak into the save), loaded
    into a fresh host and run to the end. Returns ``(straight, resumed)``."""
    straight = make_host()
    straight.run(progress=False)
    first = make_host()
    for t in range(at):
        first.step(t)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    first.step(at)                                          # the saved state must not move
    first.close()
    buffer.seek(0)
    resumed = make_host()
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    assert resumed.iteration == at
    resumed.run(progress=False)
    return straight, resumed
