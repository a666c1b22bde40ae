"""Reliability, round three (issue 36): the last tracebacks and surprises of the reliability
matrix. ``--config`` values checked against their setting's type; refusals under
``--nproc-per-node`` printed once; ``evaluate.py`` on broken imported sets, and where it writes
a foreign set's evaluations; read-only ``--out`` for ``report.py`` and ``make_subset.py``; a
truncated ``grid.png``; an expert directory that grows. Each refusal is one ``error:`` line and
exit 2, checked exactly."""
import json

import pytest

from baselines import dm
from tests.test_reliability import TINY, one_line_error


# -- 1. --config values are checked against their setting's type ------------------------------
BAD_CONFIG_VALUES = [
    ({"ipc": "ten"}, 'ipc must be a whole number, got "ten"'),
    ({"ipc": "10"}, "(write 10 without quotes)"),
    ({"ipc": 10.5}, "ipc must be a whole number, got 10.5"),
    ({"ipc": True}, "ipc must be a whole number, got true"),
    ({"momentum": None}, "momentum must be a number, got null"),
    ({"lr_img": "0.1"}, "(write 0.1 without quotes)"),
    ({"dsa": "maybe"}, 'dsa must be true or false (a JSON boolean), got "maybe"'),
    ({"dsa": "false"}, '"false" (write false without quotes)'),
    ({"dsa": 0}, "dsa must be true or false"),
    ({"compile": None}, "compile must be true or false"),
    ({"init": "bogus"}, 'init must be one of real, noise, got "bogus"'),
    ({"arch": 5}, "arch must be a string, got 5"),
    ({"plugins": 3}, "plugins must be a list or a comma string, got 3"),
    ({"eval_at": [0, "x"]}, "eval_at must be a list or a comma string"),
    ({"cap_end": "half"}, "cap_end must be a number"),
    ({"plm_logits": "bogus"}, "plm_logits must be one of"),
]


@pytest.mark.parametrize("content,needle", BAD_CONFIG_VALUES, ids=lambda v: json.dumps(v))
def test_a_config_value_of_the_wrong_type_is_refused_before_any_work(content, needle, tmp_path,
                                                                     capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(content))
    err = one_line_error(capsys, dm.main, TINY + ["--config", str(path), "--out",
                                                   str(tmp_path / "run")], needle)
    assert err.startswith(f"error: --config {path}: {next(iter(content))} must be ")
    assert not (tmp_path / "run").exists()
    one_line_error(capsys, dm.main, ["--config", str(path), "--print-config"], needle)


def test_config_values_of_the_right_type_still_read(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"dsa": False, "experts": None, "expert_seed": None, "ipc": 2,
                                "lr_img": 1, "eval_at": [0, 2], "plugins": "cap",
                                "eval_arch": ["convnet"], "compile": False}))
    assert dm.main(["--config", str(path), "--print-config"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["dsa"] is False and config["experts"] is None and config["expert_seed"] == 0
    assert config["lr_img"] == 1.0 and isinstance(config["lr_img"], float)
    assert config["eval_at"] == [0, 2] and config["plugins"] == ["cap"] and config["ipc"] == 2


# -- 2. refusals under --nproc-per-node print once; the resume hint names the flag ------------
@pytest.fixture()
def no_workers(monkeypatch):
    """``--nproc-per-node`` may not start its workers: the refusals come before."""
    from baselines.harness import launch

    def launch_(*args, **kwargs):
        raise AssertionError("the workers were started")
    monkeypatch.setattr(launch, "launch", launch_)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


@pytest.mark.parametrize("flags,needle", [
    (["--nproc-per-node", "11"], "11 processes for 10 classes"),
    (["--nproc-per-node", "2", "--arch", "resnet18"], "--arch resnet18 has BatchNorm"),
    (["--nproc-per-node", "2", "--lr-img", "-1"], "--lr-img must be > 0"),
    (["--nproc-per-node", "2", "--plugins", "cap,bogus"], "bogus"),
])
def test_a_refusal_under_nproc_per_node_is_one_line_before_any_worker(flags, needle, tmp_path,
                                                                      capsys, no_workers):
    one_line_error(capsys, dm.main, TINY + flags + ["--out", str(tmp_path / "run")], needle)
    assert not (tmp_path / "run").exists()


def test_a_resume_with_another_number_of_processes_is_one_line_naming_the_flag(tmp_path, capsys,
                                                                                no_workers):
    run = tmp_path / "run"
    assert dm.main(TINY + ["--out", str(run)]) == 0
    capsys.readouterr()
    one_line_error(capsys, dm.main, ["--resume", str(run), "--nproc-per-node", "2"],
                   "distilled by 1 process(es), this is 2",
                   f"e.g. python baselines/dm.py --resume {run})")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "world_size": 2}))
    one_line_error(capsys, dm.main, ["--resume", str(run), "--nproc-per-node", "3"],
                   "distilled by 2 process(es), this is 3",
                   f"e.g. python baselines/dm.py --nproc-per-node 2 --resume {run}, or "
                   f"torchrun with 2 processes in all)")
    one_line_error(capsys, dm.main, ["--resume", str(run), "--nproc-per-node", "2",
                                     "--lr-img", "5"], "--lr-img 5.0 differs")
    one_line_error(capsys, dm.main, ["--resume", str(tmp_path / "none"), "--nproc-per-node",
                                     "2"], "not a run directory")


def test_the_resume_hint_names_the_flag_that_started_the_workers(tmp_path, monkeypatch):
    from baselines.harness.driver import restart
    from baselines.harness.guards import StopRequest
    from baselines.harness.launch import NPROC_ENV
    from baselines.harness.runs import RunDir
    from dm_plugins.distributed import World
    monkeypatch.delenv(NPROC_ENV, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert restart(World(0, 1), "baselines/dm.py") == ("baselines/dm.py", "python")
    assert restart(World(0, 2), "baselines/dm.py") == ("baselines/dm.py",
                                                       "torchrun --nproc-per-node 2")
    monkeypatch.setenv(NPROC_ENV, "2")
    assert restart(World(1, 2), "baselines/dm.py") == ("baselines/dm.py --nproc-per-node 2",
                                                       "python")
    stop = StopRequest()
    stop.run_dir, stop.checkpoint = RunDir(tmp_path), 2
    assert stop.message(*restart(World(0, 2), "baselines/dm.py")).endswith(
        f"continue with: python baselines/dm.py --nproc-per-node 2 --resume {tmp_path}")
