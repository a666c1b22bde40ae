"""baselines/dm.py end to end on the embedded digits set, with tiny settings."""
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from baselines import dm
from baselines.harness.synset import load_synset
from tests.conftest import killed_at

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--ipc", "1", "--iterations", "3", "--batch-real", "8", "--eval-runs", "1",
        "--eval-epochs", "2", "--num-experts", "2", "--expert-epochs", "1",
        "--checkpoint-every", "2", "--log-every", "1", "--no-progress", "--device", "cpu"]
SUBSETS = [",".join(c) or "none" for r in range(4)
           for c in itertools.combinations(["cap", "ptm", "plm"], r)]


@pytest.fixture(scope="module")
def expert_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("experts")


@pytest.fixture(autouse=True)
def _cache_env(expert_cache, monkeypatch):
    monkeypatch.setenv("DM_PLUGINS_EXPERTS", str(expert_cache))


@pytest.mark.parametrize("spec", SUBSETS)
def test_every_plugin_subset_runs_and_writes_a_run_directory(spec, tmp_path, capsys):
    out = tmp_path / "run"
    assert dm.main(TINY + ["--plugins", spec, "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "synthetic.pt", "grid.png", "metrics.jsonl", "results.json",
            "run.log", "checkpoint.pt", "curves.png"} <= names
    config = json.loads((out / "config.json").read_text())
    plugins = [] if spec == "none" else spec.split(",")
    assert config["plugins"] == plugins and config["seed"] == 0
    # defaults belong to the method (or a preset), not to which plugins are on
    assert config["preset"] == "dm" and config["factor"] == 1 and config["lr_img"] == 1.0
    assert config["sources"]["factor"] == config["sources"]["lr_img"] == "method dm"
    assert config["sources"]["plugins"] == "command line"
    assert "torch" in config["environment"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1, 2]
    for r in records:
        assert {"loss", "loss_match", "seconds", "peak_memory_mb"} <= set(r)
        assert ("loss_plm" in r) == ("plm" in plugins)
    results = json.loads((out / "results.json").read_text())
    assert {"accuracy_mean", "accuracy_std", "accuracies", "arch", "protocol"} <= set(results)
    assert 0 <= results["accuracy_mean"] <= 100
    synset = load_synset(out / "synthetic.pt")
    assert synset.images.shape == (10, 1, 32, 32)
    assert synset.meta["plugins"] == plugins and synset.meta["method"] == "dm"
    assert "evaluation convnet" in capsys.readouterr().out


def test_resume_continues_where_it_stopped(tmp_path, monkeypatch):
    args = TINY + ["--iterations", "4", "--plugins", "cap,plm", "--eval-runs", "0"]
    assert dm.main(args + ["--out", str(tmp_path / "straight")]) == 0

    from dm_plugins import DMHost
    with killed_at(DMHost, 3):
        assert dm.main(args + ["--out", str(tmp_path / "cut")]) == 130
        assert not (tmp_path / "cut" / "synthetic.pt").exists()
    assert dm.main(["--resume", str(tmp_path / "cut"), "--no-progress", "--device", "cpu"]) == 0
    a = load_synset(tmp_path / "straight" / "synthetic.pt").images
    b = load_synset(tmp_path / "cut" / "synthetic.pt").images
    assert torch.equal(a, b)
    log = (tmp_path / "cut" / "run.log").read_text()
    assert "resumed at iteration 2 of 4" in log
    iterations = [json.loads(line)["iteration"]
                  for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert iterations == [0, 1, 2, 3]


def _one_line_error(capsys, argv, *fragments):
    assert dm.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def test_bad_plugins_value(capsys, tmp_path):
    _one_line_error(capsys, TINY + ["--plugins", "cap,bogus", "--out", str(tmp_path / "r")],
                    "unknown plugin 'bogus'", "available: cap, ")
    assert not (tmp_path / "r").exists()


def test_ipc_larger_than_a_class(capsys, tmp_path):
    _one_line_error(capsys, TINY + ["--ipc", "500", "--out", str(tmp_path / "r")],
                    "--ipc 500", "only")


def test_missing_data_path(capsys, tmp_path):
    _one_line_error(capsys, TINY + ["--dataset", f"imagefolder:{tmp_path / 'nowhere'}",
                                    "--out", str(tmp_path / "r")], "nowhere")


def test_existing_run_directory_and_corrupt_checkpoint(capsys, tmp_path):
    out = tmp_path / "r"
    assert dm.main(TINY + ["--eval-runs", "0", "--out", str(out)]) == 0
    _one_line_error(capsys, TINY + ["--out", str(out)], "--resume")
    ckpt = out / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:50])
    _one_line_error(capsys, ["--resume", str(out), "--no-progress"], "checkpoint", "corrupt")


def test_expert_cache_for_another_architecture_is_an_error(capsys, tmp_path):
    experts = tmp_path / "experts"
    assert dm.main(TINY + ["--plugins", "ptm", "--eval-runs", "0", "--experts", str(experts),
                           "--out", str(tmp_path / "a")]) == 0
    _one_line_error(capsys, TINY + ["--plugins", "ptm", "--arch", "convnetd2", "--experts",
                                    str(experts), "--out", str(tmp_path / "b")], "arch")


def test_plain_dm_adapter_equals_naive_per_class_dm():
    from adapters.dm import build_dm_host
    from baselines.harness.common import initial_synthetic
    from baselines.harness.datasets import load_dataset
    from baselines.harness.networks import get_network
    from dm_plugins import PluginSet
    from dm_plugins.reference import naive_dm_loss

    data = load_dataset("digits")
    factory = lambda: get_network("convnet", 1, 10, 32, width=16)
    syn = initial_synthetic(data, 2, 1, "real", seed=0)
    host = build_dm_host(data, factory, syn, plugins=PluginSet(), iterations=5, batch_real=6,
                         lr=1.0, momentum=0.5, factor=1, seed=0, device=torch.device("cpu"),
                         dsa=False)
    loss, _ = host.compute_loss(2)
    loss.backward()
    real, labels = host.real_batch(2)
    ref_syn = host.syn.detach().clone().requires_grad_(True)
    ref = naive_dm_loss(host.extractor, [real[labels == c] for c in range(10)],
                        [ref_syn[2 * c:2 * c + 2] for c in range(10)])
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(host.syn.grad, ref_syn.grad, rtol=1e-4, atol=1e-6)


def test_runs_as_a_script_from_the_repository_root():
    out = subprocess.run([sys.executable, "baselines/dm.py", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for flag in ("--plugins", "--resume", "--checkpoint-every", "[embedded]"):
        assert flag in out.stdout


def test_random_coreset_writes_an_evaluable_set(tmp_path):
    from baselines import coreset
    assert coreset.main(["--ipc", "3", "--out", str(tmp_path / "random")]) == 0
    synset = load_synset(tmp_path / "random" / "synthetic.pt")
    assert synset.images.shape == (30, 1, 32, 32)
    assert synset.meta["method"] == "coreset-random"
    assert synset.labels.tolist() == [c for c in range(10) for _ in range(3)]


# -- presets and defaults -------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    from baselines.harness.datasets import load_dataset
    return load_dataset("digits")


def _resolve(argv, dataset):
    from baselines.harness.driver import parse_args
    args, explicit = parse_args(dm.SPEC, argv)
    return dm.resolve_config(args, dataset, explicit)


def _mean_var(dataset):
    return sum(s * s for s in dataset.std) / len(dataset.std)


@pytest.mark.parametrize("preset", ["dm", "ptlm"])
@pytest.mark.parametrize("ipc", [1, 10, 100])
def test_plugins_do_not_change_factor_or_image_lr(digits, preset, ipc):
    resolved = {spec: _resolve(["--preset", preset, "--ipc", str(ipc), "--plugins", spec], digits)
                for spec in ("none", "cap", "cap,ptm,plm")}
    assert len({(c["factor"], c["lr_img"], c["momentum"]) for c in resolved.values()}) == 1
    config = resolved["none"]
    if preset == "dm":
        assert config["factor"] == 1 and config["lr_img"] == (10.0 if ipc >= 100 else 1.0)
    else:
        assert config["factor"] == 2
        assert config["lr_img"] == pytest.approx(0.01 * ipc / _mean_var(digits))
    for c in resolved.values():
        assert c["preset"] == preset and c["sources"]["plugins"] == "command line"


def test_ptlm_preset_turns_the_plugins_on_unless_given(digits):
    ptlm = _resolve(["--preset", "ptlm"], digits)
    assert ptlm["plugins"] == ["cap", "ptm", "plm"]
    assert {k: ptlm["sources"][k] for k in ("plugins", "factor", "lr_img")} == dict.fromkeys(
        ("plugins", "factor", "lr_img"), "preset ptlm")
    control = _resolve(["--preset", "ptlm", "--plugins", "none"], digits)
    assert control["plugins"] == [] and control["sources"]["plugins"] == "command line"
    assert (control["factor"], control["lr_img"]) == (ptlm["factor"], ptlm["lr_img"])
    plain = _resolve([], digits)
    assert plain["plugins"] == [] and plain["sources"]["plugins"] == "method dm"


def test_default_precedence_and_sources(digits):
    from types import SimpleNamespace
    # the embedded budget on digits, the method defaults elsewhere
    small = _resolve([], digits)
    cifar = SimpleNamespace(name="cifar10", std=(0.2023, 0.1994, 0.2010))
    full = _resolve(["--dataset", "cifar10"], cifar)
    budget = {"iterations": (100, 20000), "batch_real": (64, 256), "eval_runs": (1, 5),
              "eval_epochs": (300, 1000), "num_experts": (2, 5), "expert_epochs": (15, 70)}
    for key, (embedded, method) in budget.items():
        assert (small[key], small["sources"][key]) == (embedded, "embedded dataset"), key
        assert (full[key], full["sources"][key]) == (method, "method dm"), key
    assert (full["momentum"], full["sources"]["momentum"]) == (0.5, "method dm")
    assert full["sources"]["dataset"] == "command line"
    # command line > preset > embedded > method, even when the value equals the default
    given = _resolve(["--preset", "ptlm", "--factor", "3", "--lr-img", "0.5", "--iterations",
                      "7", "--seed", "0"], digits)
    assert (given["factor"], given["lr_img"], given["iterations"]) == (3, 0.5, 7)
    for key in ("factor", "lr_img", "iterations", "seed"):
        assert given["sources"][key] == "command line", key
    assert given["sources"]["batch_real"] == "embedded dataset"
    # every recorded setting says where it came from
    settings = set(small) - {"method", "preset", "sources"}
    assert set(small["sources"]) == settings
    assert set(small["sources"].values()) <= {"command line", "embedded dataset", "method dm"}


def test_help_states_each_default_once():
    import re
    text = dm.build_parser().format_help()
    assert "--preset" in text and "[embedded]" in text
    assert not [line for line in text.splitlines() if "default: None" in line]
    options = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    for option in options:
        assert option.count("(default") <= 1, option


def test_preset_is_named_in_the_default_run_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = TINY + ["--preset", "ptlm", "--plugins", "none", "--eval-runs", "0"]
    assert dm.main(args) == 0
    assert dm.main(args) == 0
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["dm-ptlm-digits-ipc1-none-s0", "dm-ptlm-digits-ipc1-none-s0-2"]
    config = json.loads((tmp_path / "runs" / runs[0] / "config.json").read_text())
    assert (config["preset"], config["plugins"], config["factor"]) == ("ptlm", [], 2)
