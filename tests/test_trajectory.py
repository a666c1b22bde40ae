"""Pseudo-trajectory matching, Eq. 5, checked on a tiny network."""
import pytest
import torch

from dm_plugins import DistillContext, PluginError, PluginSet, PseudoTrajectoryMatching
from dm_plugins.trajectory import injection_ratio, interpolate_parameters_


@pytest.mark.parametrize("t,T,lam,expected", [
    (0, 100, 1, 0.0), (50, 100, 1, 0.5), (99, 100, 1, 0.99),
    (50, 100, 10, 0.05), (99, 100, 10, 0.099), (30, 40, 2, 0.375),
])
def test_injection_ratio_by_hand(t, T, lam, expected):
    assert injection_ratio(t, T, lam) == pytest.approx(expected)


def test_interpolation_formula():
    init = [torch.tensor([0.0, 2.0]), torch.tensor([[1.0]])]
    star = [torch.tensor([4.0, -2.0]), torch.tensor([[3.0]])]
    params = [torch.zeros(2), torch.zeros(1, 1)]
    interpolate_parameters_(params, init, star, 0.25)
    assert params[0].tolist() == [1.0, 1.0]          # 0.25*4 + 0.75*0 ; 0.25*-2 + 0.75*2
    assert params[1].item() == pytest.approx(1.5)    # 0.25*3 + 0.75*1


@pytest.mark.parametrize("t,lam", [(0, 1), (5, 1), (9, 1), (9, 10), (4, 2.5)])
def test_plugin_writes_eq5_weights_of_the_picked_expert(pool, toy, tiny_factory, t, lam):
    net = tiny_factory().requires_grad_(False)
    plugins = PluginSet([PseudoTrajectoryMatching(pool, lam=lam)])
    plugins.setup(DistillContext(num_classes=3, ipc=1, num_iterations=10, extractor=net, real=toy))
    assert plugins.update_extractor(net, t) is True
    k = pool.pick(t)
    r = (t / lam) / 10
    expert = pool.experts[k]
    for name, p in net.named_parameters():
        expected = r * expert.trained_state[name] + (1 - r) * expert.init_state[name]
        torch.testing.assert_close(p, expected, rtol=1e-5, atol=1e-6)


def test_interpolation_does_not_compound(pool, toy, tiny_factory):
    net = tiny_factory().requires_grad_(False)
    plugin = PseudoTrajectoryMatching(pool)
    plugins = PluginSet([plugin])
    plugins.setup(DistillContext(num_classes=3, ipc=1, num_iterations=10, extractor=net, real=toy))
    plugins.update_extractor(net, 7)
    first = [p.clone() for p in net.parameters()]
    plugins.update_extractor(net, 3)
    plugins.update_extractor(net, 7)
    for a, b in zip(first, net.parameters()):
        assert torch.equal(a, b)


def test_needs_experts_and_valid_lambda(pool):
    with pytest.raises(PluginError, match="expert pool"):
        PseudoTrajectoryMatching(None)
    with pytest.raises(PluginError, match="lambda"):
        PseudoTrajectoryMatching(pool, lam=0.5)


def test_setup_rejects_an_extractor_of_another_shape(pool, toy):
    from tests.conftest import TinyNet
    plugins = PluginSet([PseudoTrajectoryMatching(pool)])
    wrong = TinyNet(width=8)
    with pytest.raises(PluginError, match="do not fit"):
        plugins.setup(DistillContext(num_classes=3, ipc=1, num_iterations=10, extractor=wrong,
                                     real=toy))
