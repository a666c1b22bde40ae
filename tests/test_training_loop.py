"""The shared training loop's pieces pinned against hand values: soft_cross_entropy, cutmix,
accuracy, and what train_classifier hands to the optimiser, the augmentation and CutMix."""
import math

import pytest
import torch
from torch import nn

import dm_plugins.training as training
from dm_plugins.training import accuracy, cutmix, soft_cross_entropy, train_classifier


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- cross-entropy

def test_soft_cross_entropy_hand_values():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, math.log(2.0)]])
    # row 0: log-softmax of class 2 = 3 - log(e + e^2 + e^3); row 1: probs (1/4, 1/4, 1/2)
    lse0 = math.log(math.e + math.e ** 2 + math.e ** 3)
    hard = torch.tensor([2, 0])
    expected_hard = ((lse0 - 3.0) + math.log(4.0)) / 2
    assert soft_cross_entropy(logits, hard).item() == pytest.approx(expected_hard, rel=1e-6)
    assert soft_cross_entropy(logits, hard.int()).item() == pytest.approx(expected_hard, rel=1e-6)
    soft = torch.tensor([[0.2, 0.3, 0.5], [0.5, 0.0, 0.5]])
    row0 = -(0.2 * (1 - lse0) + 0.3 * (2 - lse0) + 0.5 * (3 - lse0))
    row1 = -(0.5 * math.log(0.25) + 0.5 * math.log(0.5))
    assert soft_cross_entropy(logits, soft).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    # a one-hot float target is the hard label
    one_hot = torch.nn.functional.one_hot(hard, 3).float()
    assert soft_cross_entropy(logits, one_hot).item() == pytest.approx(expected_hard, rel=1e-6)


# ----------------------------------------------------------------------------- cutmix

def _coded_images(n, h, w):
    """Pixel value 1000 * image + 100 * row + column: every pixel names its source."""
    i = torch.arange(n).view(n, 1, 1, 1) * 1000
    r = torch.arange(h).view(1, 1, h, 1) * 100
    c = torch.arange(w).view(1, 1, 1, w)
    return (i + r + c).expand(n, 2, h, w).float()


@pytest.mark.parametrize("seed", range(12))
def test_cutmix_box_and_targets_match_hand_computation(seed):
    n, h, w, k = 5, 8, 12, 4
    x = _coded_images(n, h, w)
    labels = torch.tensor([0, 1, 2, 3, 1])
    mixed, soft = cutmix(x, labels, k, gen(seed))
    # reproduce the draws: permutation, lambda ~ U(0, 1) = Beta(1, 1), centre row, centre column
    ref = gen(seed)
    perm = torch.randperm(n, generator=ref)
    lam = float(torch.rand((), generator=ref))
    cy, cx = int(torch.randint(h, (), generator=ref)), int(torch.randint(w, (), generator=ref))
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    box = torch.zeros(h, w, dtype=torch.bool)
    box[y0:y1, x0:x1] = True
    # inside the box: the permuted image's own pixels; outside: untouched
    for i in range(n):
        assert torch.equal(mixed[i][:, box], x[int(perm[i])][:, box])
        assert torch.equal(mixed[i][:, ~box], x[i][:, ~box])
    area = box.sum().item() / (h * w)
    one_hot = torch.nn.functional.one_hot(labels, k).float()
    assert torch.allclose(soft, (1 - area) * one_hot + area * one_hot[perm])
    assert torch.allclose(soft.sum(1), torch.ones(n))
    # the input is not modified
    assert torch.equal(x, _coded_images(n, h, w))


def test_cutmix_mixes_by_pasted_area_not_lambda_when_clipped():
    # find draws whose box is clipped by the border; the target weight must be the clipped area
    n, h, w = 4, 8, 8
    x = _coded_images(n, h, w)
    labels = torch.tensor([0, 1, 2, 3])
    clipped = 0
    for seed in range(40):
        mixed, soft = cutmix(x, labels, 4, gen(seed))
        src = (mixed[:, 0] // 1000).long()          # source image of every pixel
        pasted = src != torch.arange(n).view(n, 1, 1)
        # pasted pixels (where the permutation moved the image) form one box shared by all
        moved = [i for i in range(n) if pasted[i].any()]
        if not moved:
            continue
        box = pasted[moved[0]]
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        assert box.sum() == len(rows) * len(cols)
        area = box.sum().item() / (h * w)
        lam = float(torch.rand((), generator=_after_perm(seed, n)))
        for i in moved:
            j = int(src[i][box][0])
            assert soft[i, labels[i]] == pytest.approx(1 - area) and soft[i, j] == pytest.approx(area)
        if abs(area - (1 - lam)) > 0.1:
            clipped += 1
    assert clipped >= 5


def _after_perm(seed, n):
    g = gen(seed)
    torch.randperm(n, generator=g)
    return g


def test_cutmix_soft_targets_pass_through():
    x = torch.rand(3, 1, 6, 6, generator=gen(1))
    soft = torch.tensor([[0.7, 0.3], [0.1, 0.9], [0.5, 0.5]])
    _, out = cutmix(x, soft, 2, gen(2))
    ref = gen(2)
    perm = torch.randperm(3, generator=ref)
    lam = float(torch.rand((), generator=ref))
    cy, cx = int(torch.randint(6, (), generator=ref)), int(torch.randint(6, (), generator=ref))
    c = int(6 * math.sqrt(1 - lam))
    side_y = min(cy + c // 2, 6) - max(cy - c // 2, 0)
    side_x = min(cx + c // 2, 6) - max(cx - c // 2, 0)
    area = side_y * side_x / 36
    assert torch.allclose(out, (1 - area) * soft + area * soft[perm])


# ----------------------------------------------------------------------------- accuracy

class Fixed(nn.Module):
    """Logits = the first K features of the flattened input (no parameters to train)."""

    def __init__(self, k=3):
        super().__init__()
        self.k = k
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x.flatten(1)[:, :self.k] * self.scale


def test_accuracy_hand_value_batches_and_mode():
    x = torch.zeros(7, 3, 1, 1)
    pred = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    x[torch.arange(7), pred] = 1.0
    y = torch.tensor([0, 1, 0, 0, 2, 2, 1])   # 4 of 7 right
    net = Fixed().train()
    assert accuracy(net, x, y, batch_size=3) == pytest.approx(400 / 7)
    assert net.training
    net.eval()
    accuracy(net, x, y)
    assert not net.training


# ----------------------------------------------------------------------------- train_classifier

class RecordingSGD(torch.optim.SGD):
    log = []

    def step(self, closure=None):
        g = self.param_groups[0]
        RecordingSGD.log.append((g["lr"], g["momentum"], g["weight_decay"]))
        return super().step(closure)


@pytest.fixture
def recording_sgd(monkeypatch):
    RecordingSGD.log = []
    monkeypatch.setattr(torch.optim, "SGD", RecordingSGD)
    return RecordingSGD.log


def toy(n=8, k=3):
    x = torch.randn(n, k, 2, 2, generator=gen(5))
    return x, torch.arange(n) % k


def test_train_classifier_lr_milestones_and_hyperparameters(recording_sgd):
    x, y = toy(n=10)
    train_classifier(Fixed(), x, y, epochs=5, lr=0.2, momentum=0.8, weight_decay=1e-3,
                     batch_size=4, lr_milestones=[2, 4], lr_gamma=0.5, generator=gen(),
                     progress=False)
    lrs = [round(lr, 10) for lr, _, _ in recording_sgd]
    # 10 images in batches of 4: 3 steps per epoch; lr x0.5 from epoch 2 and again from 4
    assert lrs == [0.2] * 6 + [0.1] * 6 + [0.05] * 3
    assert {(m, wd) for _, m, wd in recording_sgd} == {(0.8, 1e-3)}


def test_train_classifier_augment_every_batch_and_cutmix_probability(monkeypatch):
    calls = {"augment": [], "cutmix": 0}
    real_cutmix = training.cutmix

    def counting_cutmix(*a, **kw):
        calls["cutmix"] += 1
        return real_cutmix(*a, **kw)

    monkeypatch.setattr(training, "cutmix", counting_cutmix)

    def augment(batch, generator):
        calls["augment"].append(batch.shape[0])
        return batch

    x, y = toy(n=6)
    train_classifier(Fixed(), x, y, epochs=3, batch_size=4, augment=augment, generator=gen(),
                     progress=False)
    assert calls == {"augment": [4, 2] * 3, "cutmix": 0}
    calls["augment"] = []
    train_classifier(Fixed(), x, y, epochs=60, batch_size=6, cutmix_p=0.5, generator=gen(1),
                     progress=False)
    assert 18 <= calls["cutmix"] <= 42   # Binomial(60, 0.5)
    calls["cutmix"] = 0
    train_classifier(Fixed(), x, y, epochs=20, batch_size=6, cutmix_p=1.0, generator=gen(1),
                     progress=False)
    assert calls["cutmix"] == 20
