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
