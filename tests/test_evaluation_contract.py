"""Contract pins for baselines/harness/evaluation.py (surviving mutants of mutation/survivors.md).

What reaches the training loop and the optimiser, the seeds of every run, the network built for
an architecture *name*, and the result of ``runs=0``. Most tests replace the expensive parts
(``train_classifier``, ``accuracy``, ``train_and_test``, ``get_network``) by recorders, so each
takes milliseconds; the optimiser test trains a 36-parameter network for 2 epochs.
"""
import contextlib
import functools
import math
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import baselines.harness.networks as networks
from baselines.harness import evaluation
from baselines.harness.evaluation import (EvalProtocol, evaluate_synset, run_seeds,
                                          train_and_test)


def toy_set(n_per_class, seed, classes=3, size=4):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = 0.3 * torch.randn(len(y), classes, size, size, generator=g)
    x[torch.arange(len(y)), y] += 2.0
    return x, y


def tiny_factory():
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))


# ---------------------------------------------------------------------- train_and_test wiring

@pytest.fixture
def spy_training(monkeypatch):
    """Record the keyword arguments train_and_test hands to train_classifier and accuracy."""
    log = {"train": [], "accuracy": []}

    def fake_train(network, images, targets, **kw):
        log["train"].append(kw)
        return 0.0

    def fake_accuracy(network, images, labels, *args, **kw):
        log["accuracy"].append((args, kw))
        return 42.0

    monkeypatch.setattr(evaluation, "train_classifier", fake_train)
    monkeypatch.setattr(evaluation, "accuracy", fake_accuracy)
    return log


def test_train_and_test_defaults_reach_the_loop(spy_training):
    x, y = toy_set(2, 0)
    proto = EvalProtocol("plainname", epochs=3, dsa=False)
    acc = train_and_test(tiny_factory, x, y, x, y, proto, torch.Generator().manual_seed(0))
    assert acc == 42.0
    (kw,) = spy_training["train"]
    # documented defaults: progress bar on, desc = protocol name, contiguous format, CPU
    assert kw["progress"] is True
    assert kw["desc"] == "plainname"
    assert kw["channels_last"] is False
    assert kw["device"] == "cpu"
    assert spy_training["accuracy"] == [(("cpu",), {})]


def test_train_and_test_passes_its_arguments_on(spy_training):
    x, y = toy_set(2, 0)
    proto = EvalProtocol("plainname", epochs=3, dsa=False)
    # train_classifier and accuracy are recorders, so a CUDA device string is never used here
    train_and_test(tiny_factory, x, y, x, y, proto, torch.Generator().manual_seed(0),
                   device="cuda:3", progress=False, desc="my run", channels_last=True)
    (kw,) = spy_training["train"]
    assert kw["progress"] is False and kw["desc"] == "my run" and kw["channels_last"] is True
    assert kw["device"] == "cuda:3"
    assert spy_training["accuracy"] == [(("cuda:3",), {})]


def test_train_and_test_forwards_every_protocol_hyperparameter(spy_training):
    x, y = toy_set(2, 0)
    proto = EvalProtocol("x", epochs=6, lr=0.05, momentum=0.5, weight_decay=1e-3,
                         batch_size=4, lr_drop_at=0.5, dsa=False, cutmix_p=0.25)
    train_and_test(tiny_factory, x, y, x, y, proto, torch.Generator().manual_seed(0),
                   progress=False)
    (kw,) = spy_training["train"]
    assert (kw["epochs"], kw["lr"], kw["momentum"], kw["weight_decay"], kw["batch_size"]) == \
        (6, 0.05, 0.5, 1e-3, 4)
    assert list(kw["lr_milestones"]) == [3] and kw["cutmix_p"] == 0.25 and kw["augment"] is None


class RecordingSGD(torch.optim.SGD):
    log = []

    def step(self, closure=None):
        g = self.param_groups[0]
        RecordingSGD.log.append((round(g["lr"], 12), g["momentum"], g["weight_decay"]))
        return super().step(closure)


def test_non_default_protocol_reaches_the_optimiser(monkeypatch):
    # end to end (real train_classifier): none of these values is train_classifier's default.
    # 12 images, batch 4 -> 3 steps per epoch; 2 epochs, lr x0.1 from epoch int(0.5 * 2) = 1
    RecordingSGD.log = []
    monkeypatch.setattr(torch.optim, "SGD", RecordingSGD)
    x, y = toy_set(4, 0)
    proto = EvalProtocol("x", epochs=2, lr=0.05, momentum=0.5, weight_decay=1e-3, batch_size=4,
                         dsa=False)
    train_and_test(tiny_factory, x, y, x, y, proto, torch.Generator().manual_seed(0),
                   progress=False)
    assert RecordingSGD.log == [(0.05, 0.5, 1e-3)] * 3 + [(0.005, 0.5, 1e-3)] * 3


def test_lr_drop_after_the_first_of_two_epochs(monkeypatch):
    # dm protocol with 2 epochs: drop_epoch = int(0.5 * 2) = 1, one step per epoch (6 < 256)
    RecordingSGD.log = []
    monkeypatch.setattr(torch.optim, "SGD", RecordingSGD)
    x, y = toy_set(2, 0)
    evaluate_synset(x, y, x, y, tiny_factory, runs=1, protocol="dm", epochs=2, progress=False)
    assert [lr for lr, _, _ in RecordingSGD.log] == [0.01, 0.001]


def test_dance_protocol_steps_and_augmentation_reach_the_loop(monkeypatch):
    """DANCE's train.py: MultiStepLR at 2E//3 and 5E//6, gamma 0.2; batch 64; IDC's per-image
    colour then crop (DSA.sequence with one group per image), never DM's single-op DSA."""
    from baselines.harness.dsa import DSA
    RecordingSGD.log = []
    monkeypatch.setattr(torch.optim, "SGD", RecordingSGD)
    calls = {"sequence": [], "per_image": 0}
    real_sequence = DSA.sequence

    def sequence(self, x, groups, generator, num_groups=None):
        calls["sequence"].append((tuple(self.ops), groups.tolist(), x.shape[0]))
        return real_sequence(self, x, groups, generator, num_groups)

    monkeypatch.setattr(DSA, "sequence", sequence)
    monkeypatch.setattr(DSA, "per_image", lambda *a: calls.__setitem__("per_image", 1))
    x, y = toy_set(40, 0)      # 120 images: batches of 64 and 56 each epoch
    evaluate_synset(x, y, x, y, tiny_factory, runs=1, protocol="dance", epochs=6,
                    progress=False)
    lrs = [lr for lr, _, _ in RecordingSGD.log]
    assert lrs == [0.01] * 8 + [0.002] * 2 + [0.0004] * 2   # 2 steps an epoch; x0.2 at 4, 5
    assert calls["per_image"] == 0 and len(calls["sequence"]) == 12
    assert {c[0] for c in calls["sequence"]} == {("color", "crop")}
    assert [c[2] for c in calls["sequence"][:2]] == [64, 56]
    assert all(c[1] == list(range(c[2])) for c in calls["sequence"])


def test_unknown_protocol_message():
    x, y = toy_set(1, 0)
    with pytest.raises(ValueError, match=r"^unknown protocol 'idc'; known: \['dance', 'dm', 'dsa-cutmix'\]$"):
        train_and_test(tiny_factory, x, y, x, y, "idc", torch.Generator())


# ---------------------------------------------------------------------- run_seeds

def test_run_seeds_golden_values():
    # Golden values, computed once with numpy 2.4 as
    #   SeedSequence([seed, run]).generate_state(2, dtype=np.uint64) >> 1.
    # SeedSequence's output is covered by numpy's stream-compatibility policy (NEP 19), so
    # they do not depend on the numpy version. E.g. (0, 0): 0xdb2cd7e7b0f478be >> 1.
    assert run_seeds(0, 0) == (7896617691693857887, 6195319269190327588)
    assert run_seeds(0, 1) == (2918264622725855778, 4405800739349447345)
    assert run_seeds(3, 2) == (5737856171534892084, 5893287596054717974)


def test_run_seeds_are_63_bit():
    seeds = [s for i in range(20) for s in run_seeds(7, i)]
    assert all(0 <= s < 2 ** 63 for s in seeds)
    assert max(seeds) >= 2 ** 62        # uses the top bit of the 63 (2**-40 chance otherwise)
    assert max(seeds) >= 2 ** 32        # not a 32-bit state


# ---------------------------------------------------------------------- evaluate_synset wiring

def _record_runs(monkeypatch, accuracy=50.0, build=False):
    """Replace train_and_test by a recorder (optionally building the network once)."""
    calls = []

    def fake(factory, images, labels, test_images, test_labels, protocol, generator, **kw):
        calls.append(dict(kw, protocol=protocol, data_seed=generator.initial_seed(),
                          init_seed=torch.initial_seed(),
                          net=factory() if build else None))
        return accuracy

    monkeypatch.setattr(evaluation, "train_and_test", fake)
    return calls


def test_evaluate_synset_defaults_five_runs_seed_zero(monkeypatch):
    calls = _record_runs(monkeypatch)
    x, y = toy_set(1, 0)
    res = evaluate_synset(x, y, x, y, tiny_factory)
    assert res["runs"] == 5 and len(calls) == 5 and res["accuracies"] == [50.0] * 5
    for i, call in enumerate(calls):
        assert (call["init_seed"], call["data_seed"]) == run_seeds(0, i)
        # defaults handed on: progress bar on, contiguous format, CPU
        assert call["progress"] is True and call["channels_last"] is False
        assert call["device"] == torch.device("cpu")
        assert call["desc"] == f"tiny_factory run {i + 1}/5"


def test_evaluate_synset_passes_its_arguments_on(monkeypatch):
    calls = _record_runs(monkeypatch)
    x, y = toy_set(1, 0)
    evaluate_synset(x, y, x, y, tiny_factory, runs=2, progress=False, channels_last=True,
                    device="cpu")
    assert [c["desc"] for c in calls] == ["tiny_factory run 1/2", "tiny_factory run 2/2"]
    assert all(c["progress"] is False and c["channels_last"] is True for c in calls)


def test_run_name_of_a_factory_without_a_name(monkeypatch):
    calls = _record_runs(monkeypatch)
    x, y = toy_set(1, 0)
    factory = functools.partial(tiny_factory)     # a partial has no __name__
    evaluate_synset(x, y, x, y, factory, runs=1, progress=False)
    assert calls[0]["desc"] == "network run 1/1"


def test_runs_zero_gives_nan_without_warnings(monkeypatch):
    calls = _record_runs(monkeypatch)
    x, y = toy_set(1, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # no numpy "mean of empty slice" warning
        res = evaluate_synset(x, y, x, y, tiny_factory, runs=0, progress=False)
    assert calls == [] and res["accuracies"] == [] and res["runs"] == 0
    assert math.isnan(res["accuracy_mean"]) and math.isnan(res["accuracy_std"])


@pytest.mark.parametrize("device,expected", [("cpu", []), ("cuda", [0]), ("cuda:1", [1]),
                                             ("cuda:0", [0])])
def test_rng_fork_covers_the_cuda_device(monkeypatch, device, expected):
    # the caller's CUDA RNG must be forked on the evaluation device (only the CPU one on CPU).
    # train_and_test is a recorder, so no CUDA is needed; the spy forks the CPU RNG only.
    seen = []
    real_fork = torch.random.fork_rng

    @contextlib.contextmanager
    def spy_fork(devices=None, **kw):
        seen.append(devices)
        with real_fork(devices=[]):
            yield

    monkeypatch.setattr(torch.random, "fork_rng", spy_fork)
    _record_runs(monkeypatch)
    x, y = toy_set(1, 0)
    evaluate_synset(x, y, x, y, tiny_factory, runs=2, progress=False, device=device)
    assert seen == [expected, expected]


# ---------------------------------------------------------------------- architecture by name

@pytest.fixture
def spy_get_network(monkeypatch):
    log = []

    def fake_get_network(name, channels, num_classes, image_size, **kwargs):
        log.append((name, channels, num_classes, image_size, kwargs))
        return nn.Identity()

    monkeypatch.setattr(networks, "get_network", fake_get_network)
    return log


def _by_name(monkeypatch, images, labels, test_labels, **kw):
    calls = _record_runs(monkeypatch, build=True)
    evaluate_synset(images, labels, images[:len(test_labels)], test_labels, "convnet", runs=1,
                    progress=False, **kw)
    assert len(calls) == 1 and isinstance(calls[0]["net"], nn.Identity)
    assert calls[0]["desc"] == "convnet run 1/1"


def test_by_name_hard_labels_test_set_holds_the_highest_class(monkeypatch, spy_get_network):
    images = torch.zeros(4, 3, 6, 8)          # non-square: image_size is the width, shape[-1]
    _by_name(monkeypatch, images, torch.tensor([0, 1, 1, 0]), torch.tensor([4, 0]))
    assert spy_get_network == [("convnet", 3, 5, 8, {})]


def test_by_name_hard_labels_synthetic_set_holds_the_highest_class(monkeypatch,
                                                                    spy_get_network):
    images = torch.zeros(4, 2, 5, 5)
    _by_name(monkeypatch, images, torch.tensor([0, 6, 1, 0]), torch.tensor([1, 2]))
    assert spy_get_network == [("convnet", 2, 7, 5, {})]


def test_by_name_soft_labels_give_the_width(monkeypatch, spy_get_network):
    images = torch.zeros(4, 1, 7, 9)
    soft = torch.full((4, 6), 1.0 / 6)        # 6 classes; test labels only reach class 2
    _by_name(monkeypatch, images, soft, torch.tensor([2, 0]))
    assert spy_get_network == [("convnet", 1, 6, 9, {})]


def test_by_name_explicit_values_win_and_kwargs_pass(monkeypatch, spy_get_network):
    images = torch.zeros(4, 3, 6, 8)
    _by_name(monkeypatch, images, torch.tensor([0, 1, 1, 0]), torch.tensor([2, 0]),
             num_classes=10, channels=4, image_size=16, net_kwargs={"width": 7, "norm": "none"})
    assert spy_get_network == [("convnet", 4, 10, 16, {"width": 7, "norm": "none"})]


def test_by_name_trains_a_real_convnet():
    # no spies: the name branch builds a working network (3 channels, 8x8, 3 classes)
    x, y = toy_set(2, 0, size=8)
    res = evaluate_synset(x, y, x, y, "convnet", runs=1, epochs=1, progress=False,
                          net_kwargs={"width": 4})
    assert len(res["accuracies"]) == 1 and res["epochs"] == 1
    assert res["accuracies"][0] in {100.0 * k / 6 for k in range(7)}
