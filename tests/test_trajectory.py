"""Pseudo-trajectory matching, Eq. 5, checked on a tiny network."""
import pytest
import torch
from torch import nn

from dm_plugins import (DistillContext, DMHost, Expert, ExpertPool, PluginError, PluginSet,
                        PseudoTrajectoryMatching, hookimpl)
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
def test_plugin_provides_eq5_weights_of_the_picked_expert(pool, toy, tiny_factory, t, lam):
    own = tiny_factory().requires_grad_(False)
    before = [p.clone() for p in own.parameters()]
    plugins = PluginSet([PseudoTrajectoryMatching(pool, lam=lam)])
    plugins.setup(DistillContext(num_classes=3, ipc=1, num_iterations=10, extractor=own, real=toy))
    net = plugins.extractor(t, fallback=own)
    assert net is not own                                   # a network the plugin owns
    assert all(torch.equal(a, b) for a, b in zip(before, own.parameters()))
    assert net.training and not any(p.requires_grad for p in net.parameters())
    k = pool.pick(t)
    r = (t / lam) / 10
    expert = pool.experts[k]
    # hand computation, independent of the plugin's fused ops
    for name, p in net.named_parameters():
        expected = r * expert.trained_state[name] + (1 - r) * expert.init_state[name]
        torch.testing.assert_close(p, expected, rtol=1e-5, atol=1e-6)


def test_interpolation_does_not_compound(pool, toy):
    plugins = PluginSet([PseudoTrajectoryMatching(pool)])
    plugins.setup(DistillContext(num_classes=3, ipc=1, num_iterations=10, real=toy))
    first = [p.clone() for p in plugins.extractor(7).parameters()]
    plugins.extractor(3)
    again = plugins.extractor(7)
    for a, b in zip(first, again.parameters()):
        assert torch.equal(a, b)


def test_ptm_leaves_the_experts_bit_identical(pool, toy):
    snapshot = [{n: t.clone() for n, t in e.trained_state.items()} for e in pool.experts]
    inits = [{n: t.clone() for n, t in e.init_state.items()} for e in pool.experts]
    plugins = PluginSet([PseudoTrajectoryMatching(pool)])
    plugins.setup(DistillContext(num_classes=3, ipc=1, num_iterations=10, real=toy))
    for t in range(10):
        net = plugins.extractor(t)
        net.embed(torch.randn(2, 1, 8, 8)).sum()
    for k, e in enumerate(pool.experts):
        assert all(torch.equal(snapshot[k][n], e.trained_state[n]) for n in snapshot[k])
        assert all(torch.equal(inits[k][n], e.init_state[n]) for n in inits[k])
    frozen = pool.trained_network(0)
    assert all(torch.equal(frozen.state_dict()[n], snapshot[0][n]) for n in snapshot[0])


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


class BNNet(nn.Module):
    """A ConvNetBN in miniature: conv - batch norm - relu - pool - linear, with ``embed``."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.classifier = nn.Linear(16, 3)

    def embed(self, x):
        return self.features(x)

    def forward(self, x):
        return self.classifier(self.embed(x))


def _bn_pool():
    """One expert whose trained state (parameters and batch-norm buffers) is set by hand."""
    g = torch.Generator().manual_seed(3)
    with torch.random.fork_rng(devices=[]):
        init = {n: v.clone() for n, v in BNNet().state_dict().items()}
    star = {n: (v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 37)
            for n, v in init.items()}
    star["features.1.running_var"] = init["features.1.running_var"] + torch.rand(4, generator=g)
    return ExpertPool([Expert(init, star)], BNNet), init, star


def test_batch_norm_buffers_are_blended_like_the_parameters_and_counters_are_trained():
    pool, init, star = _bn_pool()
    plugins = PluginSet([PseudoTrajectoryMatching(pool)])
    plugins.setup(DistillContext(num_classes=3, ipc=1, num_iterations=4))
    r = 3 / 4                                                  # t = 3 of T = 4, lambda 1
    by_hand = {n: (r * star[n] + (1 - r) * init[n] if init[n].is_floating_point() else star[n])
               for n in init}
    assert by_hand["features.1.num_batches_tracked"].item() == 37
    net = plugins.extractor(3)
    for name, value in net.state_dict().items():
        torch.testing.assert_close(value, by_hand[name], rtol=1e-6, atol=1e-6)
        assert value.dtype == by_hand[name].dtype
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    net.embed(x)                                 # a train-mode forward moves the statistics
    assert not torch.allclose(net.features[1].running_mean, by_hand["features.1.running_mean"])
    net = plugins.extractor(3)                   # the next iteration starts from the blend again
    reference = BNNet()
    reference.load_state_dict(by_hand)
    torch.testing.assert_close(net.eval()(x), reference.eval()(x), rtol=1e-5, atol=1e-6)
    plugins.teardown()


def test_instance_norm_runs_are_unchanged_by_the_buffer_step(pool, toy, tiny_factory):
    """TinyNet (group norm) has no buffers: a short DM run with ptm is bit-identical to one whose
    extractor gets Eq. 5's parameters written by hand, and nothing else."""
    hand_net = tiny_factory().train().requires_grad_(False)

    class ParametersByHand:
        @hookimpl
        def dm_provide_extractor(self, iteration, num_iterations):
            e = pool.experts[pool.pick(iteration)]
            with torch.no_grad():
                for n, p in hand_net.named_parameters():
                    p.copy_(torch.lerp(e.init_state[n], e.trained_state[n],
                                       iteration / num_iterations))
            return hand_net

    assert list(hand_net.buffers()) == []
    syn = torch.cat([toy.images_of(c)[:2] for c in range(3)])
    runs = [DMHost(toy, tiny_factory, syn, num_iterations=3, batch_real=5, seed=4,
                   plugins=PluginSet([provider])).run(progress=False)
            for provider in (PseudoTrajectoryMatching(pool), ParametersByHand())]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], syn)
