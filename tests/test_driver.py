"""The run driver (baselines/harness/driver.py) serves any method: a toy method here brings only
its defaults, one extra argument and a build_host, and gets run directories, sources, presets,
checkpoints, resume and expert handling from the driver."""
import argparse
import json

import pytest
import torch

from baselines.harness import driver
from baselines.harness.synset import load_synset
from dm_plugins import DMHost, ExpertError
from tests.conftest import killed_at

RUN = ["--ipc", "1", "--no-progress", "--device", "cpu", "--checkpoint-every", "2",
       "--log-every", "1"]


def _toy_arguments(parser):
    parser.add_argument("--syn-scale", type=float, default=1.0,
                        help="scale of the initial synthetic images")


def _toy_host(request):
    config = request.config
    return DMHost(request.dataset.train, request.network_factory,
                  request.syn_init * config["syn_scale"], num_iterations=config["iterations"],
                  plugins=request.plugins, batch_real=config["batch_real"], lr=config["lr_img"],
                  momentum=config["momentum"], seed=config["seed"], device=request.device,
                  channels_last=request.channels_last)


TOY = driver.MethodSpec(
    name="toy", description="a toy method for the driver tests",
    defaults={"iterations": 3, "plugins": "none", "factor": 1,
              "lr_img": driver.Rule(lambda dataset, s: 0.1 * s["ipc"], "0.1 x IPC"),
              "momentum": 0.9, "batch_real": 8, "num_experts": 1, "expert_epochs": 1,
              "eval_runs": 0, "eval_epochs": 1},
    build_host=_toy_host, add_arguments=_toy_arguments,
    presets={"slow": driver.Preset("one iteration more", {"iterations": 4})},
    embedded_budget={})


def test_a_method_needs_only_defaults_arguments_and_build_host(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert driver.main(TOY, RUN + ["--syn-scale", "0.5"]) == 0
    out = tmp_path / "runs" / "toy-digits-ipc1-none-s0"
    assert {"config.json", "checkpoint.pt", "metrics.jsonl", "run.log", "synthetic.pt",
            "grid.png"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert (config["method"], config["preset"], config["iterations"]) == ("toy", "toy", 3)
    assert config["lr_img"] == pytest.approx(0.1) and config["momentum"] == 0.9
    assert config["syn_scale"] == 0.5 and config["sources"]["syn_scale"] == "command line"
    assert config["sources"]["iterations"] == config["sources"]["lr_img"] == "method toy"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1, 2]
    assert all("peak_memory_mb" in r for r in records)
    assert load_synset(out / "synthetic.pt").meta["method"] == "toy"

    assert driver.main(TOY, RUN + ["--preset", "slow"]) == 0
    slow = json.loads((tmp_path / "runs" / "toy-slow-digits-ipc1-none-s0" / "config.json")
                      .read_text())
    assert (slow["iterations"], slow["sources"]["iterations"]) == (4, "preset slow")


def test_toy_help_lists_its_presets_defaults_and_arguments():
    text = driver.build_parser(TOY).format_help()
    assert "{toy,slow}" in text and "--syn-scale" in text
    assert "(default 3; preset slow: 4)" in text and "default: None" not in text


def test_resume_is_exact_and_reads_configs_without_sources(tmp_path, monkeypatch):
    args = RUN + ["--iterations", "4"]
    assert driver.main(TOY, args + ["--out", str(tmp_path / "straight")]) == 0
    with killed_at(DMHost, 3):
        cut = tmp_path / "cut"
        assert driver.main(TOY, args + ["--out", str(cut)]) == 130
    config = json.loads((cut / "config.json").read_text())
    for key in ("preset", "sources"):  # a run directory written before presets existed
        del config[key]
    (cut / "config.json").write_text(json.dumps(config))
    # config.json wins on resume: flags that disagree with it are refused, not ignored
    assert driver.main(TOY, ["--resume", str(cut), "--no-progress", "--device", "cpu",
                             "--preset", "slow", "--iterations", "9"]) == 2
    assert driver.main(TOY, ["--resume", str(cut), "--no-progress", "--device", "cpu"]) == 0
    assert torch.equal(load_synset(tmp_path / "straight" / "synthetic.pt").images,
                       load_synset(cut / "synthetic.pt").images)
    assert "resumed at iteration 2 of 4" in (cut / "run.log").read_text()


def test_resuming_another_methods_run_is_a_one_line_error(tmp_path, capsys):
    from baselines import dm
    assert driver.main(TOY, RUN + ["--iterations", "1", "--out", str(tmp_path / "r")]) == 0
    assert dm.main(["--resume", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "'toy' run" in err and "\n" not in err


def test_experts_are_loaded_when_a_plugin_declares_it(tmp_path, monkeypatch, capsys):
    from baselines.harness import expert_cache

    def no_experts(*args, **kwargs):
        raise ExpertError("experts were asked for")

    monkeypatch.setattr(expert_cache, "load_or_train_experts", no_experts)
    assert driver.main(TOY, RUN + ["--iterations", "1", "--plugins", "cap",
                                   "--out", str(tmp_path / "cap")]) == 0
    assert driver.main(TOY, RUN + ["--iterations", "1", "--plugins", "ptm",
                                   "--out", str(tmp_path / "ptm")]) == 2
    assert "experts were asked for" in capsys.readouterr().err


def test_a_method_must_define_every_shared_default():
    with pytest.raises(ValueError, match="lr_img"):
        driver.MethodSpec(name="bad", description="", build_host=_toy_host,
                          defaults={k: v for k, v in TOY.defaults.items() if k != "lr_img"})


def test_formatter_shows_a_default_once_and_never_none():
    p = argparse.ArgumentParser(formatter_class=driver.DefaultsOnceFormatter)
    p.add_argument("--a", type=int, default=None, help="resolved later (default 5; [embedded] 2)")
    p.add_argument("--b", type=int, default=3, help="plain")
    p.add_argument("--c", default="x", help="stated (default: x, or y)")
    p.add_argument("--d", action="store_true", help="a flag")
    text = p.format_help()
    assert "default: None" not in text and "(default: 3)" in text
    assert text.count("(default") == 3 and "False" not in text
