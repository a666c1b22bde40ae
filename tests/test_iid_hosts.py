"""The dm-plugins-iid package (``contrib/iid``) on every command line: ``--plugins iid-cm`` on
dm.py, idm.py and dance.py logs its term and changes the set, ``--preset iid`` carries the
public code's weights per host, a killed run resumes to the same set, and at IPC 1 without
factorisation covariance matching is exactly a no-op (one synthetic image per class has zero
covariance, so the term's gradient is zero)."""
import json

import pytest
import torch

from adapters.dance import DANCEHost
from adapters.idm import IDMHost
from baselines import dance as dance_cli
from baselines import dm as dm_cli
from baselines import idm as idm_cli
from baselines.harness.synset import load_synset
from dm_plugins import DMHost
from tests.conftest import killed_at

BASE = ["--iterations", "2", "--batch-real", "8", "--eval-runs", "0", "--num-experts", "2",
        "--expert-epochs", "1", "--checkpoint-every", "2", "--log-every", "1",
        "--no-progress", "--device", "cpu"]
CLIS = {"dm": (dm_cli, DMHost, ["--ipc", "2"]),
        "idm": (idm_cli, IDMHost, ["--ipc", "1", "--trained-bs", "8",
                                   "--model-train-steps", "1"]),
        "dance": (dance_cli, DANCEHost, ["--ipc", "1"])}


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _images(run):
    return load_synset(run / "synthetic.pt").images


@pytest.mark.parametrize("method", list(CLIS))
def test_iid_cm_runs_on_every_host_and_its_term_is_in_the_loss(method, tmp_path,
                                                              random_experts):
    cli, _, own = CLIS[method]
    assert cli.main(BASE + own + ["--plugins", "iid-cm", "--iid-cm-weight", "100",
                                  "--out", str(tmp_path / "cm")]) == 0
    config = json.loads((tmp_path / "cm" / "config.json").read_text())
    assert config["plugins"] == ["iid-cm"] and config["iid_cm_weight"] == 100.0
    for r in _records(tmp_path / "cm"):
        others = sum(v for k, v in r.items() if k.startswith("loss_") and k != "loss_iid_cm"
                     and k not in ("loss_ce_raw",))
        assert r["loss_iid_cm"] > 0
        assert r["loss"] == pytest.approx(others + r["loss_iid_cm"], rel=1e-4)


def test_a_killed_run_with_both_terms_resumes_to_the_same_set(tmp_path, random_experts):
    args = BASE + ["--ipc", "2", "--iterations", "4", "--plugins", "iid-cm,iid-cc"]
    assert dm_cli.main(args + ["--out", str(tmp_path / "straight")]) == 0
    with killed_at(DMHost, 3):
        assert dm_cli.main(args + ["--out", str(tmp_path / "cut")]) == 130
    assert dm_cli.main(["--resume", str(tmp_path / "cut"), "--no-progress",
                        "--device", "cpu"]) == 0
    assert torch.equal(_images(tmp_path / "straight"), _images(tmp_path / "cut"))
    assert {"loss_iid_cm", "loss_iid_cc"} <= set(_records(tmp_path / "cut")[-1])


def test_preset_iid_uses_each_hosts_public_weights(capsys):
    for cli, weights in ((dm_cli, (0.01, 0.05)), (idm_cli, (0.03, 0.01))):
        capsys.readouterr()
        assert cli.main(["--preset", "iid", "--print-config"]) == 0
        config = json.loads(capsys.readouterr().out)
        assert config["plugins"] == ["iid-cm", "iid-cc"]
        assert (config["iid_cm_weight"], config["iid_cc_weight"]) == weights
        assert config["sources"]["iid_cm_weight"] == "preset iid"


def test_at_ipc_1_without_factorisation_covariance_matching_changes_nothing(tmp_path):
    args = BASE + ["--ipc", "1", "--factor", "1"]
    assert dm_cli.main(args + ["--out", str(tmp_path / "plain")]) == 0
    assert dm_cli.main(args + ["--plugins", "iid-cm", "--out", str(tmp_path / "cm")]) == 0
    assert torch.equal(_images(tmp_path / "plain"), _images(tmp_path / "cm"))
    assert all(r["loss_iid_cm"] > 0 for r in _records(tmp_path / "cm"))  # a constant, no grad


def test_iid_cc_network_resnet18_takes_g_from_a_resnet18_pool(tmp_path, monkeypatch):
    from baselines.harness import expert_cache
    from tests.conftest import random_stand_in_experts
    asked = []

    def spy(dataset, arch, **kwargs):
        asked.append((arch, kwargs["directory"].name))
        return random_stand_in_experts(dataset, arch, **kwargs)

    monkeypatch.setattr(expert_cache, "load_or_train_experts", spy)
    args = BASE + ["--ipc", "2", "--plugins", "iid-cc", "--iid-cc-weight", "10"]
    assert dm_cli.main(args + ["--iid-cc-network", "resnet18", "--out",
                               str(tmp_path / "r18")]) == 0
    assert [a for a, _ in asked] == ["convnet", "resnet18"]  # the run's pool, then g's
    assert "-resnet18-" in asked[1][1]  # a cache entry of its own
    config = json.loads((tmp_path / "r18" / "config.json").read_text())
    assert config["iid_cc_network"] == "resnet18"
    asked.clear()
    assert dm_cli.main(args + ["--out", str(tmp_path / "own")]) == 0
    assert [a for a, _ in asked] == ["convnet"]
    loss = {run: _records(tmp_path / run)[0]["loss_iid_cc"] for run in ("r18", "own")}
    assert loss["r18"] > 0 and loss["own"] > 0 and loss["r18"] != loss["own"]


def test_iid_cc_network_is_refused_before_any_work_unless_known(tmp_path, capsys):
    code = None
    try:
        code = dm_cli.main(BASE + ["--ipc", "2", "--plugins", "iid-cc", "--iid-cc-network",
                                   "vgg11", "--out", str(tmp_path / "r")])
    except SystemExit as stop:  # argparse's refusal of a choice
        code = stop.code
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "iid-cc-network" in lines[0]
    assert not (tmp_path / "r").exists()


def test_iid_cc_resnet18_without_the_resource_is_a_plugin_error():
    from dm_plugins import PluginError, PluginSet
    plugins = PluginSet.from_names("iid-cc", options={"iid-cc": {"network": "resnet18"}})
    with pytest.raises(PluginError, match="expert_pools"):
        plugins.pm.hook.dm_setup(context=None)
