"""The third-party IID plugins of contrib/iid (distribution ``dm-plugins-iid``): ``iid-cm``
(covariance matching) and ``iid-cc`` (class centralization), each checked against a naive
second implementation and a hand computation, and found through the installed entry points.

CI installs the distribution (``pip install -e contrib/iid``); without it these tests fail.
"""
import sys
from importlib.metadata import entry_points

import pytest
import torch

import dm_plugins
from dm_plugins import Expert, ExpertPool, PluginError, PluginSet
from dm_plugins.registry import builtin_plugins
from dm_plugins_iid import (ClassCentralization, CovarianceMatching, class_centralization_loss,
                            covariance_matching_loss, local_covariance)

from conftest import TinyNet


# -- naive second implementations: explicit loops over samples, channels, positions, classes --
def naive_covariance(maps):
    """maps: (N, C, H, W) feature maps, as the network produced them (before flattening)."""
    n, c = maps.shape[:2]
    f = [maps[i].reshape(c, -1) for i in range(n)]  # F_i, C x HW
    mean = sum(f) / n
    sigma = [[0.0] * c for _ in range(c)]
    for i in range(n):
        for a in range(c):
            for b in range(c):
                sigma[a][b] += float(((f[i][a] - mean[a]) * (f[i][b] - mean[b])).sum()) / n
    return torch.tensor(sigma, dtype=torch.float64)


def naive_cm(real_maps, syn_maps, weight):
    diff = naive_covariance(real_maps) - naive_covariance(syn_maps)
    return weight * sum(float(x) ** 2 for x in diff.flatten())


def naive_cc(embeddings, labels, weight):
    total = 0.0
    for c in sorted(set(labels.tolist())):
        rows = [embeddings[j] for j in range(len(labels)) if int(labels[j]) == c]
        mean = sum(rows) / len(rows)
        for r in rows:
            total += float(((r - mean) ** 2).sum())
    return weight * total


def maps(n, c=3, h=2, w=2, seed=0):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


# -- iid-cm ------------------------------------------------------------------------------
def test_covariance_matches_the_naive_loops_on_channel_major_features():
    real, syn = maps(5, seed=1), maps(3, seed=2)
    # the hosts flatten (C, H, W) maps channel-major: .flatten(1) of the network's output
    got = covariance_matching_loss(real.flatten(1), syn.flatten(1), channels=3, weight=0.7)
    assert float(got) == pytest.approx(naive_cm(real, syn, 0.7), rel=1e-10)
    assert torch.allclose(local_covariance(real.flatten(1), 3), naive_covariance(real))


def test_covariance_by_hand():
    # C = 2, HW = 1. Real x1 = (1, 2), x2 = (3, 4): mean (2, 3), deviations -(1, 1) and (1, 1),
    # Sigma_real = [[1, 1], [1, 1]]. Synthetic y1 = (0, 0), y2 = (2, -2): mean (1, -1),
    # deviations (-1, 1) and (1, -1), Sigma_syn = [[1, -1], [-1, 1]]. The difference is
    # [[0, 2], [2, 0]], squared Frobenius norm 8; weight 0.25 gives 2.
    real = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    syn = torch.tensor([[0.0, 0.0], [2.0, -2.0]])
    assert torch.equal(local_covariance(real, 2), torch.tensor([[1.0, 1.0], [1.0, 1.0]]))
    assert float(covariance_matching_loss(real, syn, 2, 0.25)) == 2.0
    # C = 1, HW = 2: F_i is a 1 x 2 row. (0, 0) and (2, 4): mean (1, 2), deviations -(1, 2)
    # and (1, 2), Sigma = ((1 + 4) + (1 + 4)) / 2 = 5.
    assert float(local_covariance(torch.tensor([[0.0, 0.0], [2.0, 4.0]]), 1)) == 5.0


def test_cm_gradient_reaches_synthetic_features_only():
    real = maps(4, seed=3).flatten(1).requires_grad_(True)
    syn = maps(3, seed=4).flatten(1).requires_grad_(True)
    covariance_matching_loss(real, syn, 3, 0.5).backward()
    assert real.grad is None
    assert syn.grad is not None and float(syn.grad.abs().sum()) > 0
    torch.autograd.gradcheck(lambda s: covariance_matching_loss(real, s, 3, 0.5),
                             (syn.detach().clone().requires_grad_(True),))


def test_cm_at_ipc_1_is_a_constant_with_zero_gradient():
    real = maps(4, seed=5)
    one = maps(1, seed=6).flatten(1).requires_grad_(True)
    loss = covariance_matching_loss(real.flatten(1), one, 3, 0.5)
    # Sigma_syn = 0 exactly, so the loss is weight * ||Sigma_real||^2 ...
    assert float(loss.detach()) == pytest.approx(0.5 * float((naive_covariance(real) ** 2).sum()))
    loss.backward()
    # ... and the synthetic row gets exactly no gradient from it
    assert torch.equal(one.grad, torch.zeros_like(one))
    two = maps(2, seed=6).flatten(1).requires_grad_(True)  # from S = 2 on, it acts
    covariance_matching_loss(real.flatten(1), two, 3, 0.5).backward()
    assert float(two.grad.abs().sum()) > 0


def test_cm_through_the_plugin_set_per_class_and_batched():
    plugins = PluginSet.from_names("iid-cm", options={"iid-cm": {"weight": 0.3, "channels": 3}})
    plugins.setup(num_classes=2, ipc=2, num_iterations=4)
    real, syn = maps(6, seed=7), maps(4, seed=8)
    real_labels, syn_labels = torch.tensor([0, 1, 0, 1, 1, 0]), torch.tensor([1, 0, 0, 1])
    expected = [naive_cm(real[real_labels == c], syn[syn_labels == c], 0.3) for c in (0, 1)]
    for c in (0, 1):
        got = plugins.feature_losses(c, real[real_labels == c].flatten(1),
                                     syn[syn_labels == c].flatten(1), 1)
        assert set(got) == {"iid_cm"} and float(got["iid_cm"]) == pytest.approx(expected[c])
    batched = plugins.batched_feature_losses(real.flatten(1), real_labels, syn.flatten(1),
                                             syn_labels, 1)
    assert float(batched["iid_cm"]) == pytest.approx(sum(expected))


def test_cm_refuses_a_feature_size_its_channels_do_not_divide():
    plugin = CovarianceMatching(weight=0.1, channels=2)
    with pytest.raises(PluginError) as info:
        plugin.dm_feature_loss(label=0, real_features=torch.zeros(3, 5),
                               syn_features=torch.zeros(2, 5))
    msg = str(info.value)
    assert "\n" not in msg and "D = 5" in msg and "--iid-cm-channels 2" in msg


# -- iid-cc ------------------------------------------------------------------------------
def test_centralization_matches_the_naive_loops():
    g = torch.Generator().manual_seed(9)
    emb, labels = torch.randn(7, 4, generator=g, dtype=torch.float64), torch.tensor(
        [2, 0, 2, 1, 0, 2, 1])
    assert float(class_centralization_loss(emb, labels, 0.3)) == pytest.approx(
        naive_cc(emb, labels, 0.3), rel=1e-10)


def test_centralization_by_hand():
    # class 0: (0, 0), (2, 0), (4, 0) with mean (2, 0): squared distances 4 + 0 + 4 = 8;
    # class 1: (1, 1) alone, 0. Total 8, weight 0.5 gives 4 (a sum over images, no mean).
    emb = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0], [4.0, 0.0]])
    assert float(class_centralization_loss(emb, torch.tensor([0, 1, 0, 0]), 0.5)) == 4.0


def random_pool(num_experts=2, seed=0):
    """Experts with random weights (what matters here is which network is used, not how well
    it was trained): a TinyNet with 1 channel, 3 classes, 8 x 8 images."""
    def factory():
        return TinyNet(channels=1, num_classes=3, width=4, size=8)
    states = []
    for s in range(2 * num_experts):
        torch.manual_seed(100 + s)
        states.append({n: v.clone() for n, v in factory().state_dict().items()})
    experts = [Expert(states[2 * k], states[2 * k + 1]) for k in range(num_experts)]
    return ExpertPool(experts, factory, seed=seed)


@pytest.fixture(scope="module")
def cc_run():
    pool = random_pool()
    plugins = PluginSet.from_names("iid-cc", experts=pool, options={"iid-cc": {"weight": 0.2}})
    plugins.setup(num_classes=3, ipc=3, num_iterations=20)
    images = torch.randn(9, 1, 8, 8, generator=torch.Generator().manual_seed(10))
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    return pool, plugins, images, labels


def test_cc_uses_the_picked_expert_and_matches_the_naive_loss(cc_run):
    pool, plugins, images, labels = cc_run
    iterations = {pool.pick(t): t for t in range(20)}
    assert set(iterations) == {0, 1}  # both experts get picked
    for k, t in iterations.items():
        with torch.no_grad():
            emb = pool.trained_network(k).embed(images).double()
            other = pool.trained_network(1 - k).embed(images).double()
        got = float(plugins.auxiliary_losses(images, labels, t)["iid_cc"])
        assert got == pytest.approx(naive_cc(emb, labels, 0.2), rel=1e-5)
        assert got != pytest.approx(naive_cc(other, labels, 0.2), rel=1e-3)
    plugin = plugins.plugins()[0]
    assert plugin.network(0, "cpu") is plugin.network(0, "cpu")  # built once, kept


def test_cc_per_class_calls_add_up_to_the_all_classes_call(cc_run):
    _, plugins, images, labels = cc_run
    whole = plugins.auxiliary_losses(images, labels, 3)["iid_cc"]
    parts = [plugins.auxiliary_losses(images[labels == c], labels[labels == c], 3)["iid_cc"]
             for c in range(3)]
    assert float(whole) == pytest.approx(float(sum(parts)), rel=1e-5)


def test_cc_gradient_reaches_the_images_not_the_expert(cc_run):
    pool, plugins, images, labels = cc_run
    x = images.clone().requires_grad_(True)
    plugins.auxiliary_losses(x, labels, 0)["iid_cc"].backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    net = plugins.plugins()[0].network(pool.pick(0), "cpu")
    assert all(p.grad is None and not p.requires_grad for p in net.parameters())


def test_cc_needs_an_expert_pool():
    assert dm_plugins.plugins_need_experts("iid-cc")
    assert not dm_plugins.plugins_need_experts("iid-cm")
    plugins = PluginSet.from_names("iid-cc")
    with pytest.raises(PluginError) as info:
        plugins.setup(num_classes=3, ipc=1, num_iterations=2)
    assert "\n" not in str(info.value) and "expert pool" in str(info.value)


# -- options ------------------------------------------------------------------------------
@pytest.mark.parametrize("name, option, value, words", [
    ("iid-cm", "weight", -0.5, "--iid-cm-weight must be >= 0"),
    ("iid-cm", "channels", 0, "--iid-cm-channels must be >= 1"),
    ("iid-cc", "weight", -1.0, "--iid-cc-weight must be >= 0"),
])
def test_bad_options_are_one_line_errors(name, option, value, words):
    with pytest.raises(PluginError) as info:
        PluginSet.from_names(name, options={name: {option: value}})
    assert "\n" not in str(info.value) and words in str(info.value)
    cls = {"iid-cm": CovarianceMatching, "iid-cc": ClassCentralization}[name]
    with pytest.raises(PluginError) as info:  # built directly, the same check
        cls(**{option: value})
    assert "\n" not in str(info.value) and f"{name}'s {option}" in str(info.value)


def test_from_names_routes_each_plugin_its_own_options():
    (cm,) = PluginSet.from_names("iid-cm", options={"iid-cm": {"weight": 0.5}}).plugins()
    assert isinstance(cm, CovarianceMatching) and (cm.weight, cm.channels) == (0.5, 128)
    pool = random_pool(num_experts=1)
    cc, cm = PluginSet.from_names("iid-cc,iid-cm", experts=pool,
                                  options={"iid-cc": {"weight": 0.2}}).plugins()
    assert (cc.weight, cc.experts, cm.weight) == (0.2, pool, 0.01)


# -- the installed distribution -------------------------------------------------------------
def test_the_entry_points_name_the_plugins():
    found = {ep.name: ep for ep in entry_points(group="dm_plugins")}
    assert found["iid-cm"].value == "dm_plugins_iid:CovarianceMatching"
    assert found["iid-cc"].value == "dm_plugins_iid:ClassCentralization"
    assert found["iid-cm"].dist.name == "dm-plugins-iid"
    assert found["iid-cm"].load() is CovarianceMatching
    assert found["iid-cc"].load() is ClassCentralization


def test_available_plugins_lists_them_as_lazy_entry_points():
    factories = dm_plugins.available_plugins()
    assert not {"iid-cm", "iid-cc"} & set(builtin_plugins())
    for name, cls in (("iid-cm", CovarianceMatching), ("iid-cc", ClassCentralization)):
        assert factories[name] is not cls and not isinstance(factories[name], type)
        assert factories[name].options == cls.options
    assert isinstance(factories["iid-cm"](weight=0.2), CovarianceMatching)


def test_listing_the_plugins_imports_nothing_of_the_package(monkeypatch):
    for module in [m for m in sys.modules if m.split(".")[0] == "dm_plugins_iid"]:
        monkeypatch.delitem(sys.modules, module)  # put back when the test ends
    factories = dm_plugins.available_plugins()
    assert "iid-cm" in factories and "dm_plugins_iid" not in sys.modules
    plugin = factories["iid-cm"](channels=4)
    assert "dm_plugins_iid" in sys.modules and plugin.channels == 4
