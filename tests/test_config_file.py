"""--print-config and --config FILE: precedence (command line > file > preset > method), a
previous run's config.json rerunning as it was, refusals in one line, and every file in
configs/ resolving to the paper's settings."""
import json
from pathlib import Path

import pytest
import torch

from baselines import dance, dm
from baselines.harness import datasets
from dm_plugins import ClassIndexedTensors
from tests.test_reliability import one_line_error

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--ipc", "1", "--iterations", "2", "--batch-real", "8", "--eval-runs", "0",
        "--no-progress", "--device", "cpu"]


def printed(capsys, main, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_print_config_shows_settings_and_sources_and_writes_nothing(tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = printed(capsys, dance.main, ["--preset", "ptlm-code", "--cap-end", "0.25",
                                          "--print-config"])
    assert config["method"] == "dance" and config["preset"] == "ptlm-code"
    assert config["cap_end"] == 0.25 and config["sources"]["cap_end"] == "command line"
    assert config["plm_target"] == "batch" and config["sources"]["plm_target"] == \
        "preset ptlm-code"
    assert config["iterations"] == 100 and config["sources"]["iterations"] == "embedded dataset"
    assert "environment" not in config and list(tmp_path.iterdir()) == []


def test_a_previous_runs_config_reruns_as_it_was(tmp_path, capsys):
    first = tmp_path / "first"
    assert dm.main(TINY + ["--plugins", "cap", "--cap-end", "0.5", "--lr-img", "0.5",
                           "--out", str(first)]) == 0
    recorded = json.loads((first / "config.json").read_text())
    capsys.readouterr()
    again = printed(capsys, dm.main, ["--config", str(first / "config.json"), "--print-config"])
    skip = {"sources", "environment", "world_size"}
    assert {k: v for k, v in again.items() if k not in skip} == \
        {k: v for k, v in recorded.items() if k not in skip}
    assert again["sources"]["lr_img"] == f"config file {first / 'config.json'}"
    second = tmp_path / "second"
    assert dm.main(["--config", str(first / "config.json"), "--iterations", "3",
                    "--out", str(second)]) == 0                  # the command line wins
    config = json.loads((second / "config.json").read_text())
    assert config["iterations"] == 3 and config["cap_end"] == 0.5 and config["lr_img"] == 0.5


def test_the_file_sits_between_the_command_line_and_the_preset(tmp_path, capsys):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"preset": "ptlm", "factor": 1, "plugins": ["cap"]}))
    config = printed(capsys, dm.main, ["--config", str(path), "--print-config"])
    assert config["preset"] == "ptlm" and config["factor"] == 1 and config["plugins"] == ["cap"]
    assert config["sources"]["lr_img"] == "preset ptlm"          # not in the file: the preset's
    config = printed(capsys, dm.main, ["--config", str(path), "--factor", "2", "--preset", "dm",
                                       "--print-config"])
    assert config["factor"] == 2 and config["preset"] == "dm"


@pytest.mark.parametrize("content,needle", [
    ("{not json", "not valid JSON"), ("[1, 2]", "JSON object"),
    ('{"lr_imgg": 1}', "unknown setting 'lr_imgg'"), ('{"method": "idm"}', "baselines/idm.py"),
    ('{"preset": "nope"}', "unknown preset"), ('{"cap_end": 3}', "--cap-end"),
])
def test_bad_files_are_refused_in_one_line(content, needle, tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(content)
    one_line_error(capsys, dm.main, TINY + ["--config", str(path), "--out",
                                            str(tmp_path / "r")], needle)
    assert not (tmp_path / "r").exists()
    one_line_error(capsys, dm.main, ["--config", str(tmp_path / "missing.json")], "cannot read")


def test_config_with_resume_is_refused(tmp_path, capsys):
    path = tmp_path / "s.json"
    path.write_text("{}")
    one_line_error(capsys, dm.main, ["--resume", str(tmp_path), "--config", str(path)],
                   "--config cannot be combined with --resume")


def fake_cifar10(name, data_path=None, download=True):
    """CIFAR-10's shape and statistics, without the download (tests run offline)."""
    assert name == "cifar10"
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat_interleave(200)
    images = torch.randn(len(labels), 3, 32, 32, generator=g)
    data = ClassIndexedTensors(images, labels, 10)
    return datasets.Dataset("cifar10", data, data, (0.4914, 0.4822, 0.4465),
                            (0.2023, 0.1994, 0.2010), [str(c) for c in range(10)])


PAPER = {  # what each file must resolve to: method, preset, plugins, iterations, factor
    "dm": ("dm", "dm", [], 20000, 1), "ptlm-paper-dm": ("dm", "ptlm", ["cap", "ptm", "plm"],
                                                          20000, 2),
    "dance": ("dance", "dance", [], 10000, 2),
    "ptlm-paper-dance": ("dance", "ptlm", ["cap", "ptm", "plm"], 10000, 2),
    "ptlm-code-dance": ("dance", "ptlm-code", ["cap", "ptm", "plm"], 10000, 2),
}


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_config_resolves(path, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "load_dataset", fake_cifar10)
    monkeypatch.chdir(tmp_path)
    data = json.loads(path.read_text())
    main = {"dm": dm.main, "dance": dance.main}[data["method"]]
    config = printed(capsys, main, ["--config", str(path), "--print-config"])
    ipc = int(path.name.split("-")[1][3:])
    row = path.name.split("-", 2)[2][:-5]
    method, preset, plugins, iterations, factor = PAPER[row]
    assert (config["method"], config["preset"], config["plugins"], config["iterations"],
            config["factor"], config["ipc"], config["dataset"]) == \
        (method, preset, plugins, iterations, factor, ipc, "cifar10")
    if row == "ptlm-code-dance":
        assert (config["cap_end"], config["ptm_lam"], config["plm_step"]) == (0.5, 2.0,
                                                                              "separate")
    if method == "dance":
        assert config["eval_protocol"] == "dance" and config["lr_img"] == pytest.approx(0.01 * ipc)
