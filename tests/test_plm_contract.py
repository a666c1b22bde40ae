"""Contract pins for dm_plugins/pseudo_label.py (surviving mutants of mutation/survivors.md).

The sampled real subset when ``max_real_per_class`` is smaller than a class (drawn with a
generator derived from (run seed, 0x9B, expert index)), a one-expert pool, argument checks and
their messages, the state before setup and after teardown, dtypes, and the memory format the
experts run in. Expected targets are recomputed here by naive loops, with tau != 0.1 so that
the sharpened targets are far from one-hot.
"""
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

from dm_plugins import (ClassIndexedTensors, DistillContext, ExpertPool, PluginError, PluginSet,
                        PseudoLabelMatching)
from dm_plugins import pseudo_label
from dm_plugins.experts import Expert
from dm_plugins.pseudo_label import (class_average_prediction, compute_pseudo_labels,
                                     pseudo_label_loss, sharpen)
from dm_plugins.seeding import make_generator

from tests.conftest import TinyNet


def naive_targets(network, real, num_classes, tau, max_per_class, generator):
    """Eq. 7-8 by hand: per class, ``max_per_class`` images drawn without replacement with
    ``torch.randperm`` on the one generator (classes in order), softmax, keep the correctly
    classified ones, average, sharpen with ``softmax(avg / tau)``."""
    rows = []
    with torch.no_grad():
        for c in range(num_classes):
            idx = [i for i, label in enumerate(real.labels.tolist()) if label == c]
            perm = torch.randperm(len(idx), generator=generator)[:max_per_class].tolist()
            images = real.images[[idx[j] for j in perm]]
            probs = F.softmax(network(images), dim=1)
            correct = [p for p in probs if int(p.argmax()) == c]
            if correct:
                rows.append(sum(correct) / len(correct))
            else:
                rows.append(torch.eye(num_classes)[c])
    avg = torch.stack(rows)
    return torch.exp(avg / tau) / torch.exp(avg / tau).sum(dim=1, keepdim=True)


def setup_plm(pool, toy, **kw):
    seed = kw.pop("seed", 0)
    plm = PseudoLabelMatching(pool, **kw)
    PluginSet([plm]).setup(DistillContext(num_classes=3, ipc=1, num_iterations=10, real=toy,
                                          seed=seed))
    return plm


# ---------------------------------------------------------------------- the real-image sample

@pytest.mark.parametrize("lazy", [True, False])
def test_targets_use_max_real_per_class_images_drawn_per_seed_and_expert(pool, toy, lazy):
    # toy: 12 images per class; 3 of them per class, tau 0.5
    plm = setup_plm(pool, toy, tau=0.5, max_real_per_class=3, seed=5, lazy=lazy)
    assert plm.max_real_per_class == 3
    for k in range(2):
        net = pool.trained_network(k)
        expected = naive_targets(net, toy, 3, 0.5, 3, make_generator(5, 0x9B, k))
        torch.testing.assert_close(plm.pseudo_labels(k), expected, rtol=1e-5, atol=1e-6)
        # the test can tell the subset apart: all 12 images give other targets
        everything = naive_targets(net, toy, 3, 0.5, 12, make_generator(5, 0x9B, k))
        assert not torch.allclose(expected, everything, rtol=0, atol=1e-4)


def test_targets_depend_on_the_run_seed_with_a_small_sample(pool, toy):
    a = setup_plm(pool, toy, tau=0.5, max_real_per_class=3, seed=5)
    b = setup_plm(pool, toy, tau=0.5, max_real_per_class=3, seed=6)
    c = setup_plm(pool, toy, tau=0.5, max_real_per_class=3, seed=5)
    for k in range(2):
        assert not torch.allclose(a.pseudo_labels(k), b.pseudo_labels(k), rtol=0, atol=1e-4)
        assert torch.equal(a.pseudo_labels(k), c.pseudo_labels(k))


def test_compute_pseudo_labels_looks_at_max_per_class_images():
    # expert = identity on 2 pixels; 4 images per class with distinct, correct logits
    logits = torch.tensor([[3.0, 0.0], [1.0, 0.0], [2.0, 1.5], [5.0, 0.0],
                           [0.0, 1.0], [0.0, 4.0], [1.0, 1.2], [0.0, 2.0]])
    images = logits.view(8, 1, 1, 2)
    real = ClassIndexedTensors(images, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    net = torch.nn.Flatten()
    for m in (1, 2, 3):
        got = compute_pseudo_labels(net, real, 2, tau=0.3, max_per_class=m,
                                    generator=torch.Generator().manual_seed(11))
        expected = naive_targets(net, real, 2, 0.3, m, torch.Generator().manual_seed(11))
        torch.testing.assert_close(got, expected)
    full = naive_targets(net, real, 2, 0.3, 4, torch.Generator().manual_seed(11))
    assert not torch.allclose(got, full)


# ---------------------------------------------------------------------- expert pools

def test_one_expert_pool(pool, toy, tiny_factory):
    single = ExpertPool(pool.experts[:1], tiny_factory, seed=0)
    plm = PseudoLabelMatching(single, tau=0.5)
    plugins = PluginSet([plm])
    plugins.setup(DistillContext(num_classes=3, ipc=1, num_iterations=4, real=toy))
    expected = naive_targets(single.trained_network(0), toy, 3, 0.5, 500,
                             make_generator(0, 0x9B, 0))
    torch.testing.assert_close(plm.pseudo_labels(0), expected, rtol=1e-5, atol=1e-6)
    syn = torch.randn(3, 1, 8, 8)
    labels = torch.tensor([0, 1, 2])
    loss = plugins.auxiliary_loss(syn, labels, 2)
    torch.testing.assert_close(
        loss, pseudo_label_loss(single.trained_network(0)(syn), labels, expected))


def test_one_class_dataset():
    torch.manual_seed(0)
    states = [TinyNet(num_classes=1).state_dict() for _ in range(2)]
    single = ExpertPool([Expert(states[0], states[1])], lambda: TinyNet(num_classes=1))
    real = ClassIndexedTensors(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    plm = PseudoLabelMatching(single)
    PluginSet([plm]).setup(DistillContext(num_classes=1, ipc=1, num_iterations=2, real=real))
    assert plm.pseudo_labels(0).tolist() == [[1.0]]


# ---------------------------------------------------------------------- arguments and messages

def test_defaults(pool):
    plm = PseudoLabelMatching(pool)
    assert plm.max_real_per_class == 500 and plm.tau == 0.1 and plm.lazy is True
    assert plm.targets == {} and plm.context is None


def test_missing_experts_message():
    with pytest.raises(PluginError, match="^" + re.escape(
            "plugin 'plm' needs an expert pool: pass experts=ExpertPool(...), "
            "e.g. from ExpertPool.load_or_train") + "$"):
        PseudoLabelMatching(None)


@pytest.mark.parametrize("tau", [0, 0.0, -0.5])
def test_tau_must_be_positive(pool, tau):
    with pytest.raises(PluginError, match="^" + re.escape(f"plm's tau must be > 0, got {tau}")
                       + "$"):
        PseudoLabelMatching(pool, tau=tau)


def test_small_tau_and_one_real_image_are_accepted(pool):
    assert PseudoLabelMatching(pool, tau=1e-6, max_real_per_class=1).max_real_per_class == 1


@pytest.mark.parametrize("m", [0, -3])
def test_max_real_per_class_at_least_one(pool, m):
    with pytest.raises(PluginError, match="^" + re.escape(
            f"plm's max_real_per_class must be >= 1, got {m}") + "$"):
        PseudoLabelMatching(pool, max_real_per_class=m)


def test_pseudo_labels_before_setup(pool):
    with pytest.raises(PluginError, match="^" + re.escape(
            "plm: dm_setup was not called (call PluginSet.setup first)") + "$"):
        PseudoLabelMatching(pool).pseudo_labels(0)


def test_setup_needs_real_images_message(pool):
    plugins = PluginSet.from_names("plm", experts=pool)
    with pytest.raises(PluginError, match="^" + re.escape(
            "plugin 'plm' needs DistillContext.real (real images to compute the pseudo-labels "
            "from); pass real=... to PluginSet.setup") + "$"):
        plugins.setup(num_classes=3, ipc=1, num_iterations=2)


def test_class_count_mismatch_message(pool, toy):
    plugins = PluginSet.from_names("plm", experts=pool)
    with pytest.raises(PluginError, match="^" + re.escape(
            "plm: the experts predict 3 classes but the run has 4; use experts trained on "
            "this dataset") + "$"):
        plugins.setup(num_classes=4, ipc=1, num_iterations=2, real=toy)


def test_teardown_forgets_the_context(pool, toy):
    plm = setup_plm(pool, toy)
    kept = plm.pseudo_labels(0)
    plm.dm_teardown()
    assert plm.context is None
    assert plm.pseudo_labels(0) is kept              # computed targets stay
    with pytest.raises(PluginError, match="dm_setup was not called"):
        plm.pseudo_labels(1)                         # no context to compute new ones


# ---------------------------------------------------------------------- dtypes and dims

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_wrong_fallback_has_the_probabilities_dtype(dtype):
    probs = torch.tensor([[0.1, 0.9], [0.2, 0.8]], dtype=dtype)
    out = class_average_prediction(probs, 0)
    assert out.dtype == dtype and out.tolist() == [1.0, 0.0]


def test_sharpen_is_along_the_last_dimension_for_any_rank():
    x = torch.arange(24, dtype=torch.float32).view(2, 3, 4) / 24
    y = sharpen(x, 0.5)
    e = torch.exp(x / 0.5)
    torch.testing.assert_close(y, e / e.sum(dim=-1, keepdim=True))


def test_loss_in_float64():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 2, 2, 1, 0])
    targets = torch.softmax(torch.randn(3, 3, generator=g, dtype=torch.float64), dim=1)
    loss = pseudo_label_loss(logits, labels, targets)
    assert loss.dtype == torch.float64
    logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    expected = sum(
        -(targets[c] * logp[labels == c]).sum(dim=1).mean() for c in range(3))
    torch.testing.assert_close(loss, expected)


def test_no_implicit_dimension_warnings(pool, toy):
    # softmax/log_softmax without dim= warn (deprecated implicit dimension); none may be used
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sharpen(torch.tensor([[0.2, 0.8]]), 0.5)
        pseudo_label_loss(torch.randn(2, 3), torch.tensor([0, 1]), torch.eye(3))
        compute_pseudo_labels(pool.trained_network(0), toy, 3, 0.5, 2, torch.Generator())


# ---------------------------------------------------------------------- memory format

def test_experts_run_on_the_loops_device_and_memory_format(pool, toy, monkeypatch):
    calls, computed = [], []
    trained, compute = pool.trained_network, pseudo_label.compute_pseudo_labels

    # spies record the device and memory format each call names ("default" when not given)
    def spy_trained(index, device="default", memory_format="default"):
        calls.append((device, memory_format))
        return trained(index, "cpu", torch.contiguous_format)

    def spy_compute(network, real, num_classes, tau, max_per_class, generator,
                    device="default", **kw):
        computed.append((device, kw.get("memory_format", "default")))
        return compute(network, real, num_classes, tau, max_per_class, generator, "cpu")

    monkeypatch.setattr(pool, "trained_network", spy_trained)
    monkeypatch.setattr(pseudo_label, "compute_pseudo_labels", spy_compute)
    plugins = PluginSet([PseudoLabelMatching(pool)])
    plugins.setup(DistillContext(num_classes=3, ipc=1, num_iterations=4, real=toy,
                                 memory_format=torch.channels_last))
    plugins.auxiliary_loss(torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2]), 1)
    assert len(calls) == 3        # the setup probe, the pseudo-labels, the loss
    cpu = torch.device("cpu")
    assert calls == [(cpu, torch.channels_last)] * 3
    assert computed == [(cpu, torch.channels_last)]


class DeviceRecorder(torch.nn.Module):
    """An 'expert' that records the device of the images it is given and answers on the CPU
    (so that a meta device can stand in for CUDA: only where the images go is checked)."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.num_classes, self.devices = num_classes, []

    def forward(self, x):
        self.devices.append(x.device)
        return torch.eye(self.num_classes)[torch.zeros(x.shape[0], dtype=torch.long)]


def test_real_images_are_moved_to_the_experts_device(toy):
    net = DeviceRecorder()
    compute_pseudo_labels(net, toy, 3, 0.5, 4, torch.Generator().manual_seed(0),
                          device="meta")
    assert net.devices == [torch.device("meta")] * 3


def test_setup_probe_runs_on_the_loops_device(pool, toy, monkeypatch):
    net = DeviceRecorder()
    monkeypatch.setattr(pool, "trained_network", lambda *args, **kw: net)
    PluginSet([PseudoLabelMatching(pool)]).setup(
        DistillContext(num_classes=3, ipc=1, num_iterations=2, real=toy, device="meta"))
    assert net.devices == [torch.device("meta")]


def test_targets_follow_the_synthetic_images_device(pool, toy, monkeypatch):
    seen = []
    monkeypatch.setattr(pseudo_label, "pseudo_label_loss",
                        lambda logits, labels, targets: seen.append(
                            (logits.device, targets.device)) or torch.zeros(()))
    plugins = PluginSet([PseudoLabelMatching(pool)])
    plugins.setup(DistillContext(num_classes=3, ipc=1, num_iterations=2, real=toy))
    syn = torch.randn(3, 1, 8, 8, device="meta")    # meta stands in for another device
    plugins.auxiliary_loss(syn, torch.tensor([0, 1, 2]), 0)
    meta = torch.device("meta")
    assert seen == [(meta, meta)]
