"""Pseudo-label matching, Eq. 7-9, against hand computations and naive loops."""
import math

import pytest
import torch
import torch.nn.functional as F

from dm_plugins import ClassIndexedTensors, DistillContext, PluginSet, PseudoLabelMatching
from dm_plugins.pseudo_label import (class_average_prediction, compute_pseudo_labels,
                                     pseudo_label_loss, sharpen)


def test_class_average_drops_misclassified():
    probs = torch.tensor([[0.7, 0.2, 0.1],
                          [0.5, 0.4, 0.1],
                          [0.1, 0.8, 0.1]])   # third sample of class 0 is misclassified
    avg = class_average_prediction(probs, 0)
    torch.testing.assert_close(avg, torch.tensor([0.6, 0.3, 0.1]))


def test_class_average_all_wrong_falls_back_to_one_hot():
    probs = torch.tensor([[0.1, 0.9], [0.2, 0.8]])
    assert class_average_prediction(probs, 0).tolist() == [1.0, 0.0]


def test_sharpen_by_hand():
    y = sharpen(torch.tensor([0.6, 0.3, 0.1]), 0.1)
    z = [math.exp(6), math.exp(3), math.exp(1)]
    expected = torch.tensor([v / sum(z) for v in z])
    torch.testing.assert_close(y, expected)


def test_loss_eq9_by_naive_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    targets = F.softmax(torch.randn(3, 3, generator=g), dim=1)
    total = 0.0
    for c in range(3):
        rows = [i for i in range(6) if labels[i] == c]
        ce = []
        for i in rows:
            logp = [v - math.log(sum(math.exp(u) for u in logits[i].tolist()))
                    for v in logits[i].tolist()]
            ce.append(-sum(targets[c, k].item() * logp[k] for k in range(3)))
        total += sum(ce) / len(ce)
    assert pseudo_label_loss(logits, labels, targets).item() == pytest.approx(total, rel=1e-5)


class FixedLogits(torch.nn.Module):
    """Logits are the first K pixels of each image: lets a test choose the expert's outputs."""

    def forward(self, x):
        return x.flatten(1)[:, :2]


def test_compute_pseudo_labels_end_to_end():
    # class 0: logits (2,0), (1,0), (0,3) [misclassified]; class 1: (0,1), (0,2)
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.0, 1.0], [0.0, 2.0]])
    images = torch.zeros(5, 1, 1, 2)
    images[:, 0, 0, :] = logits
    real = ClassIndexedTensors(images, torch.tensor([0, 0, 0, 1, 1]))
    targets = compute_pseudo_labels(FixedLogits(), real, 2, tau=0.1, max_per_class=10,
                                    generator=torch.Generator().manual_seed(0))
    p = F.softmax(logits, dim=1)
    avg0 = (p[0] + p[1]) / 2
    avg1 = (p[3] + p[4]) / 2
    expected = F.softmax(torch.stack([avg0, avg1]) / 0.1, dim=1)
    torch.testing.assert_close(targets, expected)


def test_plugin_uses_the_picked_expert_and_cached_targets(pool, toy, tiny_factory):
    plm = PseudoLabelMatching(pool, tau=0.1)
    plugins = PluginSet([plm])
    plugins.setup(DistillContext(num_classes=3, ipc=2, num_iterations=10, real=toy))
    assert plm.targets == {}                       # lazy: nothing computed at setup
    targets = torch.stack([plm.pseudo_labels(k) for k in range(2)])
    assert targets.shape == (2, 3, 3)
    torch.testing.assert_close(targets.sum(-1), torch.ones(2, 3))
    syn = torch.randn(6, 1, 8, 8, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    t = 4
    loss = plugins.auxiliary_loss(syn, labels, t)
    k = pool.pick(t)
    expected = pseudo_label_loss(pool.trained_network(k)(syn), labels, plm.targets[k])
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert syn.grad is not None and syn.grad.abs().sum() > 0
    assert all(p.grad is None for p in pool.trained_network(k).parameters())


def test_lazy_and_eager_pseudo_labels_agree(pool, toy):
    lazy, eager = PseudoLabelMatching(pool), PseudoLabelMatching(pool, lazy=False)
    for plm in (lazy, eager):
        PluginSet([plm]).setup(DistillContext(num_classes=3, ipc=2, num_iterations=10, real=toy))
    assert set(eager.targets) == {0, 1} and lazy.targets == {}
    for k in range(2):
        assert torch.equal(lazy.pseudo_labels(k), eager.targets[k])
