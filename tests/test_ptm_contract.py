"""Contract pins for dm_plugins/trajectory.py (surviving mutants of mutation/survivors.md):
the default lambda, messages, the state before setup, and where/how the provided network and
the expert weights are prepared at setup."""
import re

import pytest
import torch

from dm_plugins import DistillContext, PluginError, PluginSet, PseudoTrajectoryMatching
from dm_plugins.trajectory import injection_ratio


def test_injection_ratio_default_lambda_is_one():
    # Eq. 5 with the paper's default lambda = 1: r = t / T
    assert injection_ratio(5, 10) == 0.5
    assert injection_ratio(3, 4) == 0.75


def test_plugin_default_lambda(pool):
    assert PseudoTrajectoryMatching(pool).lam == 1.0


def test_missing_experts_message():
    with pytest.raises(PluginError, match="^" + re.escape(
            "plugin 'ptm' needs an expert pool: pass experts=ExpertPool(...), "
            "e.g. from ExpertPool.load_or_train") + "$"):
        PseudoTrajectoryMatching(None)


def test_lambda_message(pool):
    with pytest.raises(PluginError, match=r"^ptm's lambda must be >= 1, got 0\.5$"):
        PseudoTrajectoryMatching(pool, lam=0.5)


def test_extractor_before_setup(pool):
    ptm = PseudoTrajectoryMatching(pool)
    assert ptm.network is None
    with pytest.raises(PluginError, match="^" + re.escape(
            "ptm: dm_setup was not called (call PluginSet.setup first)") + "$"):
        ptm.dm_provide_extractor(0, 10)


def test_extractor_after_teardown(pool, toy):
    plugins = PluginSet([PseudoTrajectoryMatching(pool)])
    plugins.setup(DistillContext(num_classes=3, ipc=1, num_iterations=10, real=toy))
    ptm = plugins.plugins()[0]
    ptm.dm_provide_extractor(1, 10)
    ptm.dm_teardown()
    with pytest.raises(PluginError, match="dm_setup was not called"):
        ptm.dm_provide_extractor(1, 10)


def test_network_in_the_loops_memory_format(pool, toy):
    plugins = PluginSet([PseudoTrajectoryMatching(pool)])
    plugins.setup(DistillContext(num_classes=3, ipc=1, num_iterations=10, real=toy,
                                 memory_format=torch.channels_last))
    ptm = plugins.plugins()[0]
    # TinyNet's conv weights are (4, 1, 3, 3) and (4, 4, 3, 3); the second has a channel
    # dimension > 1, so only there is channels-last a different layout from contiguous
    weights = [p for p in ptm.network.parameters() if p.dim() == 4 and p.shape[1] > 1]
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) and
                           not w.is_contiguous() for w in weights)
    # and the interpolated values are still Eq. 5's (t = 4 of 10, lambda 1: r = 0.4)
    net = ptm.dm_provide_extractor(4, 10)
    expert = pool.experts[pool.pick(4)]
    for name, p in net.named_parameters():
        torch.testing.assert_close(
            p, 0.4 * expert.trained_state[name] + 0.6 * expert.init_state[name],
            rtol=1e-5, atol=1e-6)


def test_network_and_expert_weights_go_to_the_loops_device(pool, toy, monkeypatch):
    # spies record the device each call names (a dropped argument shows as "default")
    calls, built = [], []
    pair, network = pool.parameter_pair, pool.network

    def spy_pair(index, device="default"):
        calls.append((index, device))
        return pair(index, "cpu")

    def spy_network(device="default", memory_format="default"):
        built.append((device, memory_format))
        return network("cpu", torch.contiguous_format)

    monkeypatch.setattr(pool, "parameter_pair", spy_pair)
    monkeypatch.setattr(pool, "network", spy_network)
    plugins = PluginSet([PseudoTrajectoryMatching(pool)])
    plugins.setup(DistillContext(num_classes=3, ipc=1, num_iterations=10, real=toy))
    cpu = torch.device("cpu")
    assert built == [(cpu, torch.contiguous_format)]
    assert calls == [(0, cpu), (1, cpu)]
    plugins.extractor(3)
    assert calls[2] == (pool.pick(3), cpu)


def test_network_with_a_single_parameter_tensor():
    # any architecture: here one weight matrix and nothing else (Eq. 5 on that tensor)
    from dm_plugins import ExpertPool
    from dm_plugins.experts import Expert

    def factory():
        return torch.nn.Linear(4, 3, bias=False)

    init = {"weight": torch.arange(12.0).view(3, 4)}
    star = {"weight": torch.full((3, 4), 10.0)}
    single = ExpertPool([Expert(init, star)], factory)
    plugins = PluginSet([PseudoTrajectoryMatching(single, lam=2.0)])
    plugins.setup(DistillContext(num_classes=3, ipc=1, num_iterations=5))
    net = plugins.extractor(2)                         # r = (2 / 2) / 5 = 0.2
    torch.testing.assert_close(net.weight, 0.2 * star["weight"] + 0.8 * init["weight"])


def test_ptm_hands_back_its_network_wrapped_as_the_loops_is(pool, tiny_factory):
    """A loop whose network is nn.DataParallel-wrapped (the original DM code with several GPUs
    calls net.module.embed) gets ptm's network wrapped the same way, sharing its parameters."""
    from torch import nn

    from dm_plugins import DistillContext, PluginSet, PseudoTrajectoryMatching
    ptm = PseudoTrajectoryMatching(pool)
    plugins = PluginSet([ptm])
    plugins.setup(DistillContext(num_classes=3, ipc=1, num_iterations=4,
                                 extractor=nn.DataParallel(tiny_factory())))
    net = plugins.extractor(2)
    assert isinstance(net, nn.DataParallel) and net.module is ptm.network
    theta_init, theta_star = pool.parameter_pair(pool.pick(2))
    for p, a, b in zip(net.module.parameters(), theta_init, theta_star):
        torch.testing.assert_close(p, a + 0.5 * (b - a))         # r = 2 / 4
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(net.module.embed(x), ptm.network.embed(x))
    plain = PluginSet([PseudoTrajectoryMatching(pool)])
    plain.setup(DistillContext(num_classes=3, ipc=1, num_iterations=4, extractor=tiny_factory()))
    assert not isinstance(plain.extractor(0), nn.DataParallel)


def test_wrap_like_follows_every_wrapper_of_the_template(tiny_factory):
    from torch import nn

    from dm_plugins.wrapping import FrozenModule, unwrap_network, wrap_like
    inner = tiny_factory()
    assert wrap_like(None, inner) is inner and wrap_like(tiny_factory(), inner) is inner
    wrapped = wrap_like(nn.DataParallel(nn.DataParallel(tiny_factory())), inner)
    assert isinstance(wrapped, nn.DataParallel) and isinstance(wrapped.module, nn.DataParallel)
    assert unwrap_network(wrapped) is inner
    held = FrozenModule(inner)
    x = torch.randn(1, 1, 8, 8)
    torch.testing.assert_close(held(x), inner(x))
