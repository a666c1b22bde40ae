import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import dm_plugins.training as training
from baselines.harness import evaluation

from baselines.harness.dsa import DSA
from baselines.harness.evaluation import (PROTOCOLS, EvalProtocol, evaluate_synset, run_seeds,
                                          train_and_test)

ROOT = Path(__file__).resolve().parents[1]


def toy_set(n_per_class, seed, classes=3, size=8):
    """Class k: channel k bright (+2) on noise. Linearly separable even under DSA."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = 0.3 * torch.randn(len(y), classes, size, size, generator=g)
    x[torch.arange(len(y)), y] += 2.0
    return x, y


def tiny_net(classes=3):
    def factory():
        return nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(classes * 4, classes))
    return factory


FAST = EvalProtocol("fast", epochs=15, lr=0.05, batch_size=8)


class RecordingSGD(torch.optim.SGD):
    """Logs (lr, momentum, weight_decay) of every optimiser step."""
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


def test_protocols():
    assert PROTOCOLS["dm"].epochs == 1000 and PROTOCOLS["dm"].lr == 0.01
    assert PROTOCOLS["dm"].momentum == 0.9 and PROTOCOLS["dm"].weight_decay == 5e-4
    assert PROTOCOLS["dm"].batch_size == 256 and PROTOCOLS["dm"].cutmix_p == 0.0
    assert PROTOCOLS["dance"].cutmix_p == 0.5 and PROTOCOLS["dance"].dsa
    assert PROTOCOLS["dm"].dsa and PROTOCOLS["dm"].lr_drop_at == 0.5
    # DANCE's test code: batch 64, x0.2 at 2/3 and 5/6, IDC's colour-crop, CutMix 0.5
    dance = PROTOCOLS["dance"]
    assert (dance.batch_size, dance.lr_gamma, dance.augmentation, dance.epochs) == \
        (64, 0.2, "idc", 1000)
    assert dance.milestone_epochs() == [666, 833] and PROTOCOLS["dm"].milestone_epochs() == [500]
    old = PROTOCOLS["dsa-cutmix"]  # what "dance" meant before 2026-12-04
    assert (old.batch_size, old.cutmix_p, old.lr_drop_at, old.augmentation) == \
        (256, 0.5, 0.5, "dsa")


def test_learns_above_chance_and_keys():
    x, y = toy_set(4, 0)
    tx, ty = toy_set(30, 1)
    res = evaluate_synset(x, y, tx, ty, tiny_net(), runs=2, protocol=FAST, seed=0,
                          progress=False)
    assert set(res) >= {"accuracy_mean", "accuracy_std", "accuracies", "protocol", "epochs", "runs"}
    assert res["runs"] == 2 and len(res["accuracies"]) == 2 and res["epochs"] == 15
    assert res["accuracy_mean"] > 80.0


def test_deterministic_given_seed_and_runs_differ():
    x, y = toy_set(4, 0)
    tx, ty = toy_set(30, 1)
    kw = dict(runs=2, protocol="dance", epochs=3, progress=False)
    a = evaluate_synset(x, y, tx, ty, tiny_net(), seed=3, **kw)
    torch.manual_seed(999)  # global RNG state must not matter
    b = evaluate_synset(x, y, tx, ty, tiny_net(), seed=3, **kw)
    assert a == b and a["protocol"] == "dance" and a["epochs"] == 3
    assert run_seeds(3, 0) != run_seeds(3, 1) and run_seeds(3, 0) != run_seeds(4, 0)


def test_soft_labels_and_cutmix():
    x, y = toy_set(4, 0)
    tx, ty = toy_set(30, 1)
    soft = torch.nn.functional.one_hot(y, 3).float() * 0.9 + 0.1 / 3
    proto = EvalProtocol("mix", epochs=15, lr=0.05, batch_size=8, cutmix_p=0.5)
    acc = train_and_test(tiny_net(), x, soft, tx, ty, proto, torch.Generator().manual_seed(0),
                         augment=DSA(flip=False), progress=False)
    assert acc > 80.0


def test_no_dsa_and_lr_drop(recording_sgd, monkeypatch):
    # (was: 0 <= acc <= 100, which cannot fail) lr x0.1 from epoch int(0.5 * 4) = 2, no DSA
    monkeypatch.setattr(DSA, "per_image", lambda *a: pytest.fail("DSA used with dsa=False"))
    x, y = toy_set(2, 0)
    tx, ty = toy_set(5, 1)
    proto = EvalProtocol("plain", epochs=4, dsa=False, lr_drop_at=0.5)
    acc = train_and_test(tiny_net(), x, y, tx, ty, proto, torch.Generator().manual_seed(0),
                         progress=False)
    assert [round(lr, 12) for lr, _, _ in recording_sgd] == [0.01, 0.01, 0.001, 0.001]
    assert acc in {100.0 * k / 15 for k in range(16)}


# ---------------------------------------------------------------------------- CLI

def _digits_available():
    try:
        from baselines.harness.datasets import load_dataset  # noqa: F401
    except ImportError:
        return False
    return True


def _run_cli(*args):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the script must find the repo by itself
    return subprocess.run([sys.executable, str(ROOT / "baselines" / "evaluate.py"), *args],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.skipif(not _digits_available(), reason="baselines.harness.datasets not present")
def test_cli_digits(tmp_path):
    from baselines.harness.datasets import load_dataset
    from baselines.harness.synset import save_synset

    ds = load_dataset("digits")
    k = ds.num_classes
    g = torch.Generator().manual_seed(0)
    images = torch.rand(k, ds.channels, ds.image_size, ds.image_size, generator=g)
    labels = torch.arange(k)
    meta = dict(dataset="digits", mean=list(ds.mean), std=list(ds.std), ipc=1,
                factor=2, method="test", plugins=[], config={}, seed=0)
    run_dir = tmp_path / "run"
    save_synset(run_dir / "synthetic.pt", images, labels, meta)
    proc = _run_cli(str(run_dir / "synthetic.pt"), "--epochs", "2", "--runs", "1",
                    "--arch", "convnet", "--no-progress", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "convnet" in proc.stdout and "±" in proc.stdout
    out = json.loads((run_dir / "evaluation.json").read_text())
    res = out["results"]["convnet"]
    assert res["runs"] == 1 and res["epochs"] == 2 and len(res["accuracies"]) == 1
    assert out["dataset"] == "digits" and out["factor"] == 2
    proc = _run_cli(str(run_dir / "synthetic.pt"), "--arch", "convnet,nosuchnet", "--no-progress")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "nosuchnet" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_errors(tmp_path):
    bad = tmp_path / "synthetic.pt"
    bad.write_bytes(b"not a torch file")
    proc = _run_cli(str(bad), "--epochs", "1", "--runs", "1", "--no-progress")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    proc = _run_cli(str(tmp_path / "missing.pt"), "--no-progress")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------- aggregation pins

def _fake_runs(monkeypatch, accuracies):
    """Replace the per-run training by one returning the given accuracies; log each call."""
    calls = []

    def fake(factory, images, labels, test_images, test_labels, protocol, generator, **kw):
        calls.append(dict(protocol=protocol, data_seed=generator.initial_seed(),
                          init_seed=torch.initial_seed(), augment=kw.get("augment")))
        return accuracies[len(calls) - 1]

    monkeypatch.setattr(evaluation, "train_and_test", fake)
    return calls


def test_aggregation_mean_population_std_order_and_seeds(monkeypatch):
    calls = _fake_runs(monkeypatch, [10.0, 20.0, 60.0])
    x, y = toy_set(1, 0)
    aug = DSA(flip=False)
    state = torch.random.get_rng_state()
    res = evaluate_synset(x, y, x, y, tiny_net(), runs=3, protocol="dance", epochs=7, seed=4,
                          augment=aug, progress=False)
    assert res["accuracies"] == [10.0, 20.0, 60.0]
    assert res["accuracy_mean"] == pytest.approx(30.0)
    # population std (ddof=0): deviations -20, -10, 30 -> sqrt(1400 / 3); ddof=1 would be 26.46
    assert res["accuracy_std"] == pytest.approx(math.sqrt(1400.0 / 3.0))
    assert res["runs"] == 3 and res["protocol"] == "dance" and res["epochs"] == 7
    assert torch.equal(torch.random.get_rng_state(), state)   # caller's RNG untouched
    for i, call in enumerate(calls):
        assert (call["init_seed"], call["data_seed"]) == run_seeds(4, i)
        assert call["protocol"].epochs == 7 and call["protocol"].cutmix_p == 0.5
        assert call["augment"] is aug


def test_aggregation_single_run_and_unequal_values(monkeypatch):
    _fake_runs(monkeypatch, [42.5])
    x, y = toy_set(1, 0)
    res = evaluate_synset(x, y, x, y, tiny_net(), runs=1, progress=False)
    assert res["accuracies"] == [42.5] and res["accuracy_mean"] == 42.5
    assert res["accuracy_std"] == 0.0 and res["protocol"] == "dm" and res["epochs"] == 1000
    values = [71.0, 64.5, 70.25, 80.0]
    _fake_runs(monkeypatch, values)
    res = evaluate_synset(x, y, x, y, tiny_net(), runs=4, progress=False)
    assert res["accuracy_mean"] == pytest.approx(sum(values) / 4)
    assert res["accuracy_std"] == pytest.approx(float(np.std(values)))
    assert res["accuracies"] == values


@pytest.mark.parametrize("epochs,expected", [(4, [0.01] * 2 + [0.001] * 2),
                                             (5, [0.01] * 2 + [0.001] * 3)])
def test_dm_protocol_lr_decay_reaches_optimiser(recording_sgd, epochs, expected):
    x, y = toy_set(4, 0)   # 12 images < batch 256: one optimiser step per epoch
    evaluate_synset(x, y, x, y, tiny_net(), runs=1, protocol="dm", epochs=epochs,
                    progress=False)
    assert [round(lr, 12) for lr, _, _ in recording_sgd] == expected
    assert {(m, wd) for _, m, wd in recording_sgd} == {(0.9, 5e-4)}


def test_batch_size_reaches_loop(recording_sgd):
    x, y = toy_set(100, 0)   # 300 images, batch 256: two steps per epoch
    evaluate_synset(x, y, x[:3], y[:3], tiny_net(), runs=1, protocol="dm", epochs=2,
                    progress=False)
    assert len(recording_sgd) == 4


@pytest.mark.parametrize("name", ["dm", "dsa-cutmix"])
def test_protocol_switches_cutmix_and_dsa(monkeypatch, name):
    counts = {"cutmix": 0, "dsa": 0}
    real_cutmix, real_per_image = training.cutmix, DSA.per_image

    def counting_cutmix(*a, **kw):
        counts["cutmix"] += 1
        return real_cutmix(*a, **kw)

    def counting_per_image(self, *a, **kw):
        counts["dsa"] += 1
        return real_per_image(self, *a, **kw)

    monkeypatch.setattr(training, "cutmix", counting_cutmix)
    monkeypatch.setattr(DSA, "per_image", counting_per_image)
    x, y = toy_set(2, 0)
    evaluate_synset(x, y, x, y, tiny_net(), runs=1, protocol=name, epochs=40, seed=1,
                    progress=False)
    assert counts["dsa"] == 40   # one batch per epoch, DSA on every batch in both protocols
    if name == "dm":
        assert counts["cutmix"] == 0
    else:
        assert 8 <= counts["cutmix"] <= 32   # Binomial(40, 0.5), seeded
