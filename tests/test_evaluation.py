import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

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


def test_protocols():
    assert PROTOCOLS["dm"].epochs == 1000 and PROTOCOLS["dm"].lr == 0.01
    assert PROTOCOLS["dm"].momentum == 0.9 and PROTOCOLS["dm"].weight_decay == 5e-4
    assert PROTOCOLS["dm"].batch_size == 256 and PROTOCOLS["dm"].cutmix_p == 0.0
    assert PROTOCOLS["dance"].cutmix_p == 0.5 and PROTOCOLS["dance"].dsa


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


def test_no_dsa_and_lr_drop():
    x, y = toy_set(2, 0)
    tx, ty = toy_set(5, 1)
    proto = EvalProtocol("plain", epochs=4, dsa=False, lr_drop_at=0.5)
    acc = train_and_test(tiny_net(), x, y, tx, ty, proto, torch.Generator().manual_seed(0),
                         progress=False)
    assert 0.0 <= acc <= 100.0


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
