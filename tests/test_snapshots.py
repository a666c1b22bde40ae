"""Snapshots (--eval-at / --eval-every): the points, their refusals, the curve in results.json,
and a killed run that resumes without re-evaluating the points it has."""
import json

import pytest
import torch

from baselines import dm, evaluate
from baselines.harness.common import UsageError
from baselines.harness.snapshots import read_curve, snapshot_points
from baselines.harness.synset import load_synset
from baselines.harness.validation import check_snapshots
from tests.conftest import killed_at

TINY = ["--ipc", "1", "--iterations", "4", "--batch-real", "8", "--eval-runs", "2",
        "--eval-epochs", "2", "--checkpoint-every", "1", "--log-every", "1", "--no-progress",
        "--device", "cpu"]


def test_points_are_the_union_of_eval_at_and_every_n_with_the_last():
    assert snapshot_points({"iterations": 10, "eval_every": 4}) == [0, 4, 8, 10]
    assert snapshot_points({"iterations": 10, "eval_every": 5, "eval_at": [3]}) == [0, 3, 5, 10]
    assert snapshot_points({"iterations": 10, "eval_at": [7, 2]}) == [2, 7]
    assert snapshot_points({"iterations": 10}) == []


@pytest.mark.parametrize("config, fragment", [
    ({"iterations": 4, "eval_at": [5], "eval_runs": 1}, "past the run's last iteration"),
    ({"iterations": 4, "eval_at": [2], "eval_runs": 0}, "--eval-at needs evaluation runs"),
    ({"iterations": 4, "eval_every": 2, "eval_runs": 0}, "--eval-every needs"),
    ({"iterations": 4, "eval_at": ["x"], "eval_runs": 1}, "whole iterations"),
])
def test_bad_points_are_refused(config, fragment):
    with pytest.raises(UsageError, match=fragment):
        check_snapshots(config)


def test_bad_eval_at_on_the_command_line_is_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        dm.main(TINY + ["--eval-at", "0,two", "--out", str(tmp_path / "r")])
    assert exit_.value.code == 2
    assert "not an iteration" in capsys.readouterr().err
    assert dm.main(TINY + ["--eval-at", "9", "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()


def _points(run):
    return {p["iteration"]: p["accuracies"] for p in read_curve(run)}


def test_curve_resume_and_same_set_as_a_run_without_snapshots(tmp_path):
    plain, straight, cut = tmp_path / "plain", tmp_path / "straight", tmp_path / "cut"
    assert dm.main(TINY + ["--out", str(plain)]) == 0
    assert dm.main(TINY + ["--eval-every", "2", "--out", str(straight)]) == 0
    # the snapshots change nothing the run distils, and the final evaluation is point T's
    assert torch.equal(load_synset(plain / "synthetic.pt").images,
                       load_synset(straight / "synthetic.pt").images)
    results = json.loads((straight / "results.json").read_text())
    assert [p["iteration"] for p in results["curve"]] == [0, 2, 4]
    assert results["curve"][-1]["accuracies"] == results["accuracies"]
    assert results["accuracies"] == json.loads((plain / "results.json").read_text())["accuracies"]
    for it in (0, 2, 4):
        kept = load_synset(straight / "snapshots" / f"iter-{it:06d}.pt")
        assert kept.meta["snapshot_iteration"] == it
    assert torch.equal(load_synset(straight / "snapshots" / "iter-000004.pt").images,
                       load_synset(straight / "synthetic.pt").images)
    assert "snapshot 2/4: convnet" in (straight / "run.log").read_text()

    from dm_plugins import DMHost
    with killed_at(DMHost, 3):
        assert dm.main(TINY + ["--eval-every", "2", "--out", str(cut)]) == 130
    (cut / "snapshots" / "iter-000002.json").unlink()  # killed while it evaluated point 2
    first = (cut / "snapshots" / "iter-000000.json").stat().st_mtime_ns
    assert dm.main(["--resume", str(cut), "--no-progress", "--device", "cpu"]) == 0
    assert (cut / "snapshots" / "iter-000000.json").stat().st_mtime_ns == first  # not redone
    assert _points(cut) == _points(straight)
    assert json.loads((cut / "results.json").read_text())["curve"] == results["curve"]


def test_evaluate_one_snapshot_again(tmp_path, capsys):
    run = tmp_path / "r"
    assert dm.main(TINY + ["--eval-at", "1", "--out", str(run)]) == 0
    assert evaluate.main([str(run), "--snapshot", "1", "--no-progress"]) == 0
    again = json.loads((run / "snapshots" / "evaluations" / "iter-000001-1.json").read_text())
    assert again["accuracies"] == _points(run)[1]  # same set, same seeds, same numbers
    assert again["snapshot"] == 1
    assert evaluate.main([str(run), "--snapshot", "3"]) == 2
    assert "it has 1" in capsys.readouterr().err
