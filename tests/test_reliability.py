"""Faults a user meets, tried on the command lines: every bad input refused before anything is
written (one line, exit 2, no run directory left), a diverging run stopped at its first
non-finite loss with the last finite checkpoint kept, signals that checkpoint and resume exactly,
flags given with --resume, torn metrics and stale temp files, and no overwritten run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from baselines import coreset, dance, dm, idm
from baselines.harness.synset import load_synset
from dm_plugins.loop import DMHost
from tests.conftest import killed_at

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--ipc", "1", "--iterations", "3", "--batch-real", "8", "--eval-runs", "0",
        "--checkpoint-every", "2", "--log-every", "1", "--no-progress", "--device", "cpu"]


def one_line_error(capsys, main, argv, *needles):
    """Run ``main(argv)``: exit 2 and one stderr line starting with ``error:``, no traceback."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


BAD_INPUTS = [
    (["--lr-img", "-1"], "--lr-img"), (["--lr-img", "0"], "--lr-img"),
    (["--momentum", "-0.5"], "--momentum"), (["--momentum", "1.5"], "--momentum"),
    (["--checkpoint-every", "0"], "--checkpoint-every"), (["--log-every", "0"], "--log-every"),
    (["--factor", "40"], "--factor"), (["--factor", "0"], "--factor"),
    (["--arch", "foonet"], "--arch"), (["--eval-arch", "foonet"], "--eval-arch"),
    (["--eval-runs", "1", "--eval-arch", ","], "--eval-arch"),
    (["--device", "tpu"], "--device"), (["--iterations", "0"], "--iterations"),
    (["--iterations", "-3"], "--iterations"), (["--batch-real", "0"], "--batch-real"),
    (["--batch-real", "-1"], "--batch-real"), (["--eval-runs", "-1"], "--eval-runs"),
    (["--eval-epochs", "0"], "--eval-epochs"), (["--plugins", ""], "--plugins"),
    (["--plugins", "cap,bogus"], "bogus"), (["--ipc", "0"], "--ipc"),
    (["--tau", "0"], "--plm-tau"), (["--lam", "0.5"], "--ptm-lam"),
    (["--alpha", "0"], "--cap-alpha"), (["--cap-end", "0"], "--cap-end"),
    (["--cap-end", "1.5"], "--cap-end"), (["--plm-lr", "0"], "--plm-lr"),
    (["--plm-logits", "nope"], "--plm-logits"), (["--plm-target", "nope"], "--plm-target"),
    (["--num-experts", "0"], "--num-experts"), (["--expert-epochs", "0"], "--expert-epochs"),
    (["--iterations", "abc"], "--iterations"), (["--no-such-flag"], "--no-such-flag"),
    (["--preset", "nope"], "--preset"), (["--expert-recipe", "nope"], "--expert-recipe"),
    (["--dataset", "imagefolder:"], "needs a path"),
]


@pytest.mark.parametrize("argv,needle", BAD_INPUTS, ids=lambda v: " ".join(v)
                         if isinstance(v, list) else None)
def test_bad_input_is_refused_before_anything_is_written(argv, needle, tmp_path, capsys):
    out = tmp_path / "run"
    one_line_error(capsys, dm.main, TINY + argv + ["--out", str(out)], needle)
    assert not out.exists()


@pytest.mark.parametrize("main,argv,needle", [
    (idm.main, ["--net-num", "0"], "--net-num"), (idm.main, ["--trained-bs", "0"], "--trained-bs"),
    (idm.main, ["--lr-net", "0"], "--lr-net"), (idm.main, ["--ce-weight", "-1"], "--ce-weight"),
    (idm.main, ["--fetch-net-num", "-1"], "--fetch-net-num"),
    (dance.main, ["--batch-syn-max", "0"], "--batch-syn-max"),
    (dance.main, ["--iter-calib", "-1"], "--iter-calib"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_method_settings_are_refused_before_anything_is_written(main, argv, needle, tmp_path,
                                                                capsys):
    out = tmp_path / "run"
    one_line_error(capsys, main, TINY + argv + ["--out", str(out)], needle)
    assert not out.exists()


def test_out_and_experts_that_are_files(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line_error(capsys, dm.main, TINY + ["--out", str(afile)], "is a file")
    one_line_error(capsys, dm.main, TINY + ["--plugins", "ptm", "--experts", str(afile), "--out",
                                            str(tmp_path / "r")], "--experts", "is a file")
    assert not (tmp_path / "r").exists()


def test_a_setup_failure_leaves_no_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    one_line_error(capsys, idm.main, TINY + ["--compile", "--out", str(out)], "--compile")
    assert not out.exists()


# -- divergence -------------------------------------------------------------------------------
def test_non_finite_loss_stops_the_run_and_keeps_the_last_finite_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    err = one_line_error(capsys, dm.main, TINY + ["--iterations", "6", "--checkpoint-every", "1",
                                                  "--lr-img", "1e30", "--out", str(out)],
                         "non-finite", "lower --lr-img")
    assert "iteration" in err and ("matching loss" in err or "synthetic images" in err)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(all(v == v for v in r.values() if isinstance(v, float)) for r in records)
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert torch.isfinite(state["host"]["syn"]).all()
    assert state["iteration"] < 6 and not (out / "synthetic.pt").exists()


def test_saturated_images_get_a_warning(tmp_path, capsys):
    out = tmp_path / "run"
    assert dm.main(TINY + ["--lr-img", "1e4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "warning:" in text and "lower --lr-img" in text
    assert "warning:" in (out / "run.log").read_text()
    assert dm.main(TINY + ["--out", str(tmp_path / "calm")]) == 0
    assert "warning:" not in capsys.readouterr().out


# -- resume -----------------------------------------------------------------------------------
@pytest.fixture()
def cut_run(tmp_path):
    """A dm run stopped (KeyboardInterrupt) during iteration 3 of 4, checkpoint after 2."""
    out = tmp_path / "cut"
    with killed_at(DMHost, 3):
        assert dm.main(TINY + ["--iterations", "4", "--out", str(out)]) == 130
    return out


def test_flags_given_with_resume_must_agree_with_the_run(cut_run, capsys):
    one_line_error(capsys, dm.main, ["--resume", str(cut_run), "--lr-img", "0.5"],
                   "--lr-img", "recorded")
    one_line_error(capsys, dm.main, ["--resume", str(cut_run), "--out", "x"], "--out")
    one_line_error(capsys, dm.main, ["--resume", str(cut_run), "--plugins", "cap"], "--plugins")
    assert dm.main(["--resume", str(cut_run), "--device", "cpu", "--no-progress",
                    "--iterations", "4"]) == 0                 # agreeing flags are fine


def test_resume_keeps_the_recorded_device(cut_run):
    config = json.loads((cut_run / "config.json").read_text())
    assert config["device"] == "cpu"                            # resolved, not "auto"


def test_torn_metrics_line_and_stale_temp_files_are_handled_on_resume(cut_run, tmp_path):
    with open(cut_run / "metrics.jsonl", "a") as f:
        f.write('{"loss": 1.0, "iter')                          # a write cut by a kill
    stale = cut_run / ".checkpoint.pt.abc123.tmp"
    stale.write_bytes(b"partial")
    assert dm.main(["--resume", str(cut_run), "--no-progress"]) == 0
    records = [json.loads(line) for line in (cut_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1, 2, 3]
    assert not stale.exists()
    straight = tmp_path / "straight"
    assert dm.main(TINY + ["--iterations", "4", "--out", str(straight)]) == 0
    assert torch.equal(load_synset(straight / "synthetic.pt").images,
                       load_synset(cut_run / "synthetic.pt").images)


def test_a_run_cut_before_its_first_checkpoint_resumes_from_scratch_without_old_records(
        tmp_path):
    out = tmp_path / "early"
    with killed_at(DMHost, 1):                                 # checkpoint-every 2: none yet
        assert dm.main(TINY + ["--iterations", "4", "--out", str(out)]) == 130
    assert not list(out.glob("checkpoint*.pt"))
    assert dm.main(["--resume", str(out), "--no-progress"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1, 2, 3]   # iteration 0 not twice
    straight = tmp_path / "straight"
    assert dm.main(TINY + ["--iterations", "4", "--out", str(straight)]) == 0
    assert torch.equal(load_synset(straight / "synthetic.pt").images,
                       load_synset(out / "synthetic.pt").images)


def test_an_edited_config_that_no_longer_fits_the_checkpoint(cut_run, capsys):
    config = json.loads((cut_run / "config.json").read_text())
    config["ipc"] = 2
    (cut_run / "config.json").write_text(json.dumps(config))
    one_line_error(capsys, dm.main, ["--resume", str(cut_run), "--no-progress"], "config.json")
    del config["plugins"]
    (cut_run / "config.json").write_text(json.dumps(config))
    one_line_error(capsys, dm.main, ["--resume", str(cut_run), "--no-progress"], "plugins")


# -- signals ----------------------------------------------------------------------------------
def test_sigint_finishes_the_iteration_checkpoints_and_resumes_exactly(tmp_path, monkeypatch,
                                                                       capsys):
    out, straight = tmp_path / "cut", tmp_path / "straight"
    real_step = DMHost.step

    def signalled(self, t=None):
        metrics = real_step(self, t)
        if self.iteration == 2:                               # during iteration 1
            os.kill(os.getpid(), signal.SIGINT)
        return metrics
    monkeypatch.setattr(DMHost, "step", signalled)
    assert dm.main(TINY + ["--iterations", "5", "--checkpoint-every", "100",
                           "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"continue with: python baselines/dm.py --resume {out}" in err
    assert "after 2 iterations" in err and "RUN_DIR" not in err
    assert "interrupted (SIGINT)" in (out / "run.log").read_text()
    assert torch.load(out / "checkpoint.pt", weights_only=False)["iteration"] == 2
    monkeypatch.setattr(DMHost, "step", real_step)

    # a resumed run stopped before its checkpoint is restored keeps it, and says so
    real_restore = DMHost.load_state_dict

    def interrupted_restore(self, state):
        os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(DMHost, "load_state_dict", interrupted_restore)
    assert dm.main(["--resume", str(out), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "its checkpoint on disk is kept" in err and "iteration 0" not in err
    assert torch.load(out / "checkpoint.pt", weights_only=False)["iteration"] == 2
    monkeypatch.setattr(DMHost, "load_state_dict", real_restore)
    assert dm.main(["--resume", str(out), "--no-progress"]) == 0
    assert dm.main(TINY + ["--iterations", "5", "--out", str(straight)]) == 0
    assert torch.equal(load_synset(straight / "synthetic.pt").images,
                       load_synset(out / "synthetic.pt").images)


def test_sigterm_from_outside_checkpoints_exits_143_and_resumes_exactly(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "baselines/dm.py", *TINY, "--iterations", "40", "--checkpoint-every",
         "1000", "--out", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not ((out / "metrics.jsonl").exists()
                                          and (out / "metrics.jsonl").read_text().strip()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err
    assert "interrupted (SIGTERM)" in err and f"--resume {out}" in err
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert 1 <= state["iteration"] < 40
    assert dm.main(["--resume", str(out), "--no-progress"]) == 0
    straight = tmp_path / "straight"
    assert dm.main(TINY + ["--iterations", "40", "--out", str(straight)]) == 0
    assert torch.equal(load_synset(straight / "synthetic.pt").images,
                       load_synset(out / "synthetic.pt").images)


# -- never overwrite a run --------------------------------------------------------------------
def test_coreset_refuses_an_existing_run(tmp_path, capsys):
    out = tmp_path / "set"
    argv = ["--ipc", "1", "--out", str(out)]
    assert coreset.main(argv) == 0
    before = (out / "synthetic.pt").read_bytes()
    one_line_error(capsys, coreset.main, argv + ["--seed", "1"], "--overwrite")
    assert (out / "synthetic.pt").read_bytes() == before
    assert coreset.main(argv + ["--seed", "1", "--overwrite"]) == 0
    assert (out / "synthetic.pt").read_bytes() != before
    run = tmp_path / "run"
    assert dm.main(TINY + ["--out", str(run)]) == 0
    one_line_error(capsys, coreset.main, ["--ipc", "1", "--out", str(run), "--overwrite"],
                   "distillation run")
