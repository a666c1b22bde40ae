"""Expert pool: training, deterministic pick, save/load, compatibility errors."""
import pytest
import torch

from dm_plugins import ExpertError, ExpertPool
from dm_plugins.training import accuracy
from tests.conftest import TinyNet


def test_pick_is_a_function_of_seed_and_iteration(pool, tiny_factory):
    picks = [pool.pick(t) for t in range(200)]
    assert set(picks) == {0, 1}
    assert picks == [pool.pick(t) for t in range(200)]
    other = ExpertPool(pool.experts, tiny_factory, seed=1)
    assert picks != [other.pick(t) for t in range(200)]


def test_experts_learn_and_keep_their_initial_weights(pool, toy, tiny_factory):
    for k, expert in enumerate(pool.experts):
        assert expert.meta["train_accuracy"] > 60
        net = tiny_factory()
        net.load_state_dict(expert.init_state)
        trained = pool.trained_network(k)
        assert accuracy(trained, toy.images, toy.labels) > accuracy(net, toy.images, toy.labels) - 1e-9
        assert any(not torch.equal(expert.init_state[n], expert.trained_state[n])
                   for n in expert.init_state)
    # different experts start from different random weights
    a, b = pool.experts
    assert not torch.equal(a.init_state["classifier.weight"], b.init_state["classifier.weight"])


def test_training_is_reproducible(toy, tiny_factory, pool):
    again = ExpertPool.train(tiny_factory, toy.images, toy.labels, num_experts=2, epochs=6,
                             seed=0, batch_size=16, lr=0.05, progress=False)
    for e1, e2 in zip(pool.experts, again.experts):
        for n in e1.trained_state:
            assert torch.equal(e1.trained_state[n], e2.trained_state[n])


def test_save_load_round_trip(pool, tiny_factory, tmp_path):
    pool.save(tmp_path / "experts")
    loaded = ExpertPool.load(tmp_path / "experts", tiny_factory, expect={"arch": "tiny"})
    assert len(loaded) == 2 and loaded.meta["dataset"] == "toy"
    for e1, e2 in zip(pool.experts, loaded.experts):
        for n in e1.init_state:
            assert torch.equal(e1.init_state[n], e2.init_state[n])
            assert torch.equal(e1.trained_state[n], e2.trained_state[n])
    assert not list((tmp_path / "experts").glob("*.tmp"))


def test_load_errors_are_one_line(pool, tiny_factory, tmp_path):
    with pytest.raises(ExpertError, match="no expert pool"):
        ExpertPool.load(tmp_path / "missing", tiny_factory)
    pool.save(tmp_path / "e")
    with pytest.raises(ExpertError, match="trained with arch='tiny'") as info:
        ExpertPool.load(tmp_path / "e", tiny_factory, expect={"arch": "convnet"})
    assert "\n" not in str(info.value)
    with pytest.raises(ExpertError, match="do not fit"):
        ExpertPool.load(tmp_path / "e", lambda: TinyNet(num_classes=5))
    path = tmp_path / "e" / "expert_1.pt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ExpertError, match="unreadable"):
        ExpertPool.load(tmp_path / "e", tiny_factory)


def test_check_compatible(pool):
    pool.check_compatible(TinyNet())
    with pytest.raises(ExpertError):
        pool.check_compatible(TinyNet(width=8))


# -- contract v2: getting experts from one call, independent of the caller's RNG ------------
import random  # noqa: E402

import numpy  # noqa: E402
from torch import nn  # noqa: E402


def _rng_snapshot():
    return torch.get_rng_state().clone(), random.getstate(), numpy.random.get_state()[1].copy()


def _same_rng(a, b):
    return torch.equal(a[0], b[0]) and a[1] == b[1] and (a[2] == b[2]).all()


def reseeding_factory():
    torch.manual_seed(1234)          # what research factories do (the original DM: wall clock)
    random.seed(1)
    numpy.random.seed(1)
    return TinyNet()


def test_reseeding_factory_gives_distinct_experts_and_leaves_the_caller_rng_alone(toy, tmp_path):
    torch.manual_seed(5)
    other = TinyNet()
    before = _rng_snapshot()
    pool = ExpertPool.load_or_train(tmp_path / "e", reseeding_factory, toy.images, toy.labels,
                                    num_experts=2, epochs=1, batch_size=12, progress=False)
    pool.trained_network(1)
    pool.parameter_pair(1)
    pool.check_compatible(other)
    pool.network()
    assert _same_rng(before, _rng_snapshot())
    a, b = pool.experts
    assert not torch.equal(a.init_state["features.0.weight"], b.init_state["features.0.weight"])


def test_initial_weights_are_a_fresh_construction_under_the_derived_seed(pool, tiny_factory):
    from dm_plugins.experts import _INIT_STREAM
    from dm_plugins.seeding import derive_seed
    for k, e in enumerate(pool.experts):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(0, _INIT_STREAM, k))
            fresh = tiny_factory()
        for n, v in fresh.state_dict().items():
            assert torch.equal(v, e.init_state[n])


class PinnedWeights(nn.Module):
    """Raw parameters no reset_parameters() re-draws, after a fixed reseed: every copy equal."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.weight = nn.Parameter(0.1 * torch.randn(3, 64))

    def embed(self, x):
        return x.flatten(1)

    def forward(self, x):
        return self.embed(x) @ self.weight.t()


def test_experts_collapsed_by_the_factory_are_refused(toy):
    with pytest.raises(ExpertError, match="identical weights"):
        ExpertPool.train(PinnedWeights, toy.images, toy.labels, num_experts=2, epochs=1,
                         batch_size=12, progress=False)


def test_load_or_train_resumes_expert_by_expert(toy, tiny_factory, tmp_path):
    kw = dict(epochs=2, batch_size=12, lr=0.05, progress=False, meta={"dataset": "toy"})
    once = ExpertPool.load_or_train(tmp_path / "once", tiny_factory, toy.images, toy.labels,
                                    num_experts=3, **kw)
    lines = []
    ExpertPool.load_or_train(tmp_path / "steps", tiny_factory, toy.images, toy.labels,
                             num_experts=1, **kw)
    steps = ExpertPool.load_or_train(tmp_path / "steps", tiny_factory, toy.images, toy.labels,
                                     num_experts=3, log=lines.append, **kw)
    assert "loaded 1" in lines[0] and "training 2 of 3" in lines[1]
    assert [e.meta["index"] for e in steps.experts] == [0, 1, 2]
    for a, b in zip(once.experts, steps.experts):
        assert all(torch.equal(a.trained_state[n], b.trained_state[n]) for n in a.trained_state)
    reloaded = ExpertPool.load(tmp_path / "steps", tiny_factory)
    assert [e.meta["index"] for e in reloaded.experts] == [0, 1, 2]
    assert reloaded.meta["augment"] == "none" and reloaded.meta["epochs"] == 2
    with pytest.raises(ExpertError, match="epochs=2 but epochs=3"):
        ExpertPool.load_or_train(tmp_path / "steps", tiny_factory, toy.images, toy.labels,
                                 num_experts=3, **{**kw, "epochs": 3})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ExpertError, match="holds no expert pool"):
        ExpertPool.load_or_train(tmp_path / "other", tiny_factory, toy.images, toy.labels,
                                 num_experts=1, **kw)


def test_wrapped_networks_load(pool, tiny_factory, tmp_path):
    wrapped = ExpertPool(pool.experts, lambda: nn.DataParallel(TinyNet()))
    wrapped.check_compatible(nn.DataParallel(TinyNet()))
    wrapped.check_compatible(torch.compile(TinyNet()))
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(wrapped.trained_network(0)(x), pool.trained_network(0)(x))
    # state dicts saved from a DataParallel model carry "module." prefixes
    from dm_plugins import Expert
    prefixed = Expert({f"module.{n}": v for n, v in pool.experts[0].init_state.items()},
                      {f"module._orig_mod.{n}": v
                       for n, v in pool.experts[0].trained_state.items()})
    merged = ExpertPool([prefixed], tiny_factory)
    torch.testing.assert_close(merged.trained_network(0)(x), pool.trained_network(0)(x))
