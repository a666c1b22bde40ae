"""The minimal DM host: equals naive per-class DM, reproducible, resumable."""
import pytest
import torch

from dm_plugins import DMHost, PluginSet
from dm_plugins.reference import naive_dm_loss
from tests.conftest import group_scale_augment


def _syn_init(toy, ipc, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([toy.sample(c, ipc, g) for c in range(toy.num_classes)])


@pytest.mark.parametrize("augment", [None, group_scale_augment], ids=["no-aug", "siamese-aug"])
def test_plain_host_equals_naive_per_class_dm(toy, tiny_factory, augment):
    ipc, t = 3, 5
    host = DMHost(toy, tiny_factory, _syn_init(toy, ipc), num_iterations=10, augment=augment,
                  batch_real=5, seed=3)
    loss, _ = host.compute_loss(t)
    loss.backward()
    fast_grad = host.syn.grad.clone()

    # naive: same network weights and real batches, classes one at a time
    net = host.extractor
    real, labels = host.real_batch(t)
    real_batches = [real[labels == c] for c in range(3)]
    syn = host.syn.detach().clone().requires_grad_(True)
    syn_batches = [syn[c * ipc:(c + 1) * ipc] for c in range(3)]
    per_class_aug = None
    if augment is not None:
        from dm_plugins.seeding import make_generator
        scales = 0.5 + torch.rand(3, generator=make_generator(3, 0xA6, t))
        per_class_aug = lambda x, c: x * scales[c]
    naive = naive_dm_loss(net, real_batches, syn_batches, per_class_aug)
    naive.backward()
    torch.testing.assert_close(loss, naive, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast_grad, syn.grad, rtol=1e-4, atol=1e-7)


def test_plain_host_reinitialises_the_network_every_iteration(toy, tiny_factory):
    host = DMHost(toy, tiny_factory, _syn_init(toy, 1), num_iterations=3)
    w0 = host.prepare_extractor(0).features[0].weight.clone()
    w1 = host.prepare_extractor(1).features[0].weight.clone()
    assert not torch.equal(w0, w1)
    assert torch.equal(w0, host.prepare_extractor(0).features[0].weight)


def _run(toy, factory, plugins_spec, pool, iterations, seed=0, stop_at=None, state=None):
    plugins = PluginSet.from_names(plugins_spec, experts=pool)
    host = DMHost(toy, factory, _syn_init(toy, 2), num_iterations=iterations, plugins=plugins,
                  augment=group_scale_augment, batch_real=6, seed=seed, lr=0.5)
    if state is not None:
        host.load_state_dict(state)
    end = stop_at if stop_at is not None else iterations
    while host.iteration < end:
        host.step()
    host.close()
    return host


@pytest.mark.parametrize("spec", ["none", "cap,ptm,plm"])
def test_same_seed_same_synthetic_set(toy, tiny_factory, pool, spec):
    a = _run(toy, tiny_factory, spec, pool, 4).syn.detach()
    b = _run(toy, tiny_factory, spec, pool, 4).syn.detach()
    c = _run(toy, tiny_factory, spec, pool, 4, seed=1).syn.detach()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, _syn_init(toy, 2))


@pytest.mark.parametrize("spec", ["none", "cap,ptm,plm"])
def test_resume_continues_where_it_stopped(toy, tiny_factory, pool, spec):
    straight = _run(toy, tiny_factory, spec, pool, 5).syn.detach()
    first = _run(toy, tiny_factory, spec, pool, 5, stop_at=2)
    state = first.state_dict()
    assert state["iteration"] == 2
    resumed = _run(toy, tiny_factory, spec, pool, 5, state=state)
    assert torch.equal(straight, resumed.syn.detach())


def test_all_plugins_report_each_part(toy, tiny_factory, pool):
    plugins = PluginSet.from_names("cap,ptm,plm", experts=pool)
    host = DMHost(toy, tiny_factory, _syn_init(toy, 2), num_iterations=10, plugins=plugins,
                  batch_real=8)
    metrics = [host.step() for _ in range(10)]
    host.close()
    last = metrics[-1]
    assert last["loss"] == pytest.approx(last["loss_match"] + last["loss_plm"], rel=1e-5)
    assert metrics[0]["real_kept"] > metrics[-1]["real_kept"]   # typical mode narrows with t


def test_class_means_handles_ragged_classes():
    from dm_plugins.loop import class_means
    f = torch.tensor([[1.0], [3.0], [10.0]])
    assert class_means(f, torch.tensor([0, 0, 2]), 3).flatten().tolist() == [2.0, 0.0, 10.0]
