"""``dm_feature_loss``: the per-class feature hook, on every host and through PluginSet.

The probe plugin returns, for each class, the class's own matching term computed from the
features the hook receives, ``||mean(real) - mean(syn)||^2``. A host that passes the features
it matches (the rows cap keeps, the synthetic features of that class) therefore logs
``loss_probe == loss_match``, and its total is twice the match: a check that fails for wrong
rows, a wrong class, a missed or repeated call, or a loss left out of the total."""
import torch

import pytest

from adapters.dance import DANCEHost
from adapters.idm import IDMHost
from dm_plugins import DMHost, PluginError, PluginSet, hookimpl
from tests.conftest import group_scale_augment, straight_and_resumed
from tests.test_dance import make_host as make_dance
from tests.test_idm import make_host as make_idm


class Probe:
    """Records each call and returns the class's matching term as ``probe``."""

    def __init__(self, weight=1.0):
        self.weight = weight
        self.calls = []

    @hookimpl
    def dm_feature_loss(self, label, real_features, syn_features, iteration):
        self.calls.append((iteration, label, tuple(real_features.shape),
                           tuple(syn_features.shape), real_features.requires_grad,
                           syn_features.requires_grad))
        term = ((real_features.mean(0) - syn_features.mean(0)) ** 2).sum()
        return {"probe": self.weight * term}


class Clash:
    @hookimpl
    def dm_auxiliary_loss(self, syn_images):
        return {"probe": syn_images.sum() * 0}


def _syn_init(toy, ipc, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([toy.sample(c, ipc, g) for c in range(toy.num_classes)])


@pytest.mark.parametrize("names", ["", "cap"])
def test_dm_host_passes_each_class_its_matched_features_once(toy, tiny_factory, names):
    probe = Probe()
    plugins = PluginSet([probe, *PluginSet.from_names(names).plugins()])
    host = DMHost(toy, tiny_factory, _syn_init(toy, 2), num_iterations=3,
                  augment=group_scale_augment, batch_real=5, seed=3, plugins=plugins)
    for t in range(3):
        metrics = host.step(t)
        assert metrics["loss_probe"] == pytest.approx(metrics["loss_match"], rel=1e-5)
        assert metrics["loss"] == pytest.approx(2 * metrics["loss_match"], rel=1e-5)
    assert [(t, c) for t, c, *_ in probe.calls] == [(t, c) for t in range(3) for c in range(3)]
    for _, _, real_shape, syn_shape, real_grad, syn_grad in probe.calls:
        assert syn_shape[0] == 2 and not real_grad and syn_grad
        assert real_shape[0] == 5 if not names else 1 <= real_shape[0] <= 5


def test_dm_host_without_the_hook_keeps_its_fused_path_and_its_set(toy, tiny_factory):
    """No plugin implements the hook: the set equals a run whose probe has weight 0 except
    through the probe's own term (weight 0 adds 0 to the loss): same images, torch.equal."""
    def run(plugins):
        host = DMHost(toy, tiny_factory, _syn_init(toy, 2), num_iterations=3,
                      augment=group_scale_augment, batch_real=5, seed=3, plugins=plugins)
        host.run(progress=False)
        return host.syn.detach()
    plain = run(PluginSet())
    assert torch.equal(plain, run(PluginSet([Probe(weight=0.0)])))
    assert not torch.equal(plain, run(PluginSet([Probe(weight=1.0)])))


@pytest.mark.parametrize("names", ["", "cap"])
def test_idm_host_adds_the_feature_losses_to_each_class_loss(toy, tiny_factory, names):
    probe = Probe()
    host = make_idm(toy, tiny_factory, cls=IDMHost,
                    plugins=PluginSet([probe, *PluginSet.from_names(names).plugins()]))
    metrics = host.step(0)
    assert metrics["loss_probe"] == pytest.approx(metrics["loss_match"], rel=1e-5)
    classes = sorted({c for _, c, *_ in probe.calls})
    assert classes == [0, 1, 2] and all(t == 0 for t, *_ in probe.calls)
    assert all(not r and s for *_, r, s in probe.calls)


@pytest.mark.parametrize("names", ["", "cap"])
def test_dance_host_adds_the_feature_losses_to_its_inner_class_step(toy, pool, names):
    probe = Probe()
    host = make_dance(toy, pool, cls=DANCEHost,
                      plugins=PluginSet([probe, *PluginSet.from_names(names).plugins()]))
    metrics = host.step(0)
    assert metrics["loss_probe"] == pytest.approx(metrics["loss_match"], rel=1e-5)
    assert [c for _, c, *_ in probe.calls] == [0, 1, 2]
    assert metrics["loss"] == pytest.approx(
        2 * metrics["loss_match"] + metrics["loss_ce"], rel=1e-5)


def test_hosts_with_the_hook_resume_exactly(toy, tiny_factory, pool):
    straight, resumed = straight_and_resumed(lambda: DMHost(
        toy, tiny_factory, _syn_init(toy, 2), num_iterations=4, augment=group_scale_augment,
        batch_real=5, seed=3, plugins=PluginSet([Probe()])))
    assert torch.equal(straight.syn, resumed.syn)
    straight, resumed = straight_and_resumed(
        lambda: make_dance(toy, pool, cls=DANCEHost, plugins=PluginSet([Probe()])))
    assert torch.equal(straight.syn, resumed.syn)


def test_batched_feature_losses_sum_the_per_class_calls_over_the_kept_rows():
    torch.manual_seed(0)
    real, syn = torch.randn(12, 6), torch.randn(6, 6, requires_grad=True)
    real_labels, syn_labels = torch.arange(3).repeat_interleave(4), torch.arange(3).repeat(2)
    for names in ("", "cap"):
        probe = Probe()
        plugins = PluginSet([probe, *PluginSet.from_names(names).plugins()])
        plugins.setup(num_classes=3, ipc=2, num_iterations=4)
        batched = plugins.batched_feature_losses(real, real_labels, syn, syn_labels, 3)
        keep = plugins.batched_keep_mask(real, real_labels, syn, syn_labels, 3)
        by_hand = sum(((real[keep & (real_labels == c)].mean(0)
                        - syn[syn_labels == c].mean(0)) ** 2).sum() for c in range(3))
        assert torch.allclose(batched["probe"], by_hand)
        assert [c for _, c, *_ in probe.calls] == [0, 1, 2]
        if names:
            assert not bool(keep.all())          # cap dropped rows at t = 3 of 4
        assert plugins.feature_loss(0, real[:4], syn[syn_labels == 0], 3) is not None


def test_a_loss_name_in_both_hooks_is_refused_in_one_line(toy, tiny_factory):
    host = DMHost(toy, tiny_factory, _syn_init(toy, 1), num_iterations=2, batch_real=5,
                  plugins=PluginSet([Probe(), Clash()]))
    with pytest.raises(PluginError, match=r"^two sources return a loss named 'probe'$"):
        host.step(0)


def test_without_an_implementation_the_calls_are_free_and_empty():
    plugins = PluginSet()
    plugins.setup(num_classes=2, ipc=1, num_iterations=2)
    assert not plugins.uses_feature_loss
    assert plugins.feature_losses(0, torch.zeros(3, 4), torch.zeros(1, 4), 0) == {}
    assert plugins.feature_loss(0, torch.zeros(3, 4), torch.zeros(1, 4), 0) == 0.0
