"""Progress lines where bars are off: the heartbeat's arithmetic, and a command line run with
stderr redirected (as on a cluster) writes heartbeat lines to stdout and run.log and no
carriage return anywhere."""
import os
import subprocess
import sys
from pathlib import Path

from dm_plugins import heartbeat
from dm_plugins.heartbeat import Heartbeat, bars_wanted, clock

ROOT = Path(__file__).resolve().parents[1]


def test_heartbeat_lines_rate_and_eta(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(heartbeat.time, "perf_counter", lambda: now[0])
    lines = []
    beat = Heartbeat(lines.append, "distill", total=10, every=4, start=2)   # resumed at 2
    for done in range(3, 11):
        now[0] += 2.0
        beat(done, loss=1.23456, real_kept=1)
    # the first own step, every 4th and the last; 2 s per step, counting only this process's
    assert [line.split(":")[0] for line in lines] == ["distill 3/10", "distill 4/10",
                                                      "distill 8/10", "distill 10/10"]
    assert lines[0] == "distill 3/10: loss 1.235, real_kept 1; 2.00 s/it, elapsed 2s, ETA 14s"
    assert lines[-1].endswith("elapsed 16s, ETA 0s")
    assert clock(3725) == "1h02m05s" and clock(125) == "2m05s" and clock(4) == "4s"


class Stream:
    def __init__(self, tty):
        self.tty = tty

    def isatty(self):
        return self.tty


def test_bars_only_on_a_terminal():
    assert bars_wanted(False, Stream(True)) and not bars_wanted(True, Stream(True))
    assert not bars_wanted(False, Stream(False)) and not bars_wanted(False, object())


def test_a_run_with_stderr_redirected_talks_in_plain_lines(tmp_path):
    out, err = tmp_path / "run", tmp_path / "stderr.txt"
    with open(err, "w") as stderr:
        done = subprocess.run(
            [sys.executable, str(ROOT / "baselines" / "dm.py"), "--ipc", "1", "--iterations", "4",
             "--log-every", "2", "--batch-real", "8", "--eval-runs", "2", "--eval-epochs", "1",
             "--device", "cpu", "--out", str(out)],
            stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=tmp_path, timeout=600,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, err.read_text()
    log = (out / "run.log").read_text()
    for text in (done.stdout, log):
        for line in ("distill 1/4: loss ", "distill 2/4: loss ", "distill 4/4: loss ",
                     "evaluation run 1/2: arch convnet, run 1, accuracy ",
                     "evaluation run 2/2: "):
            assert line in text, text
        assert "ETA" in text and "s/it" in text
    assert "\r" not in done.stdout + log + err.read_text()
