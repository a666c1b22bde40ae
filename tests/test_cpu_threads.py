"""Threads of a command line: passive OpenMP wait unless the user chose, ``--threads``, what the
run records; the benchmark's busy workers and its contention table."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from baselines import dm
from baselines.harness import cpu_threads
from benchmarks import contention

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "digits", "--ipc", "1", "--iterations", "1", "--batch-real", "4",
        "--eval-runs", "0", "--no-progress", "--device", "cpu"]


def test_passive_wait_is_set_only_when_the_user_set_none():
    env = {}
    assert cpu_threads.prefer_passive_wait(env) is True
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert cpu_threads.prefer_passive_wait(env) is False
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}
    env = {"OMP_WAIT_POLICY": "  "}  # blank is unset
    assert cpu_threads.prefer_passive_wait(env) is True and env["OMP_WAIT_POLICY"] == "PASSIVE"


def test_wait_policy_names_who_chose_it(monkeypatch):
    monkeypatch.setattr(cpu_threads, "_state", {"set_by_us": False, "too_late": False})
    assert cpu_threads.wait_policy({}) == ("OpenMP's default", "unset")
    assert cpu_threads.wait_policy({"OMP_WAIT_POLICY": "ACTIVE"}) == ("active", "OMP_WAIT_POLICY")
    monkeypatch.setattr(cpu_threads, "_state", {"set_by_us": True, "too_late": False})
    assert cpu_threads.wait_policy({"OMP_WAIT_POLICY": "PASSIVE"}) == ("passive", "ours")
    monkeypatch.setattr(cpu_threads, "_state", {"set_by_us": True, "too_late": True})
    assert cpu_threads.wait_policy({"OMP_WAIT_POLICY": "PASSIVE"})[1].startswith("too late")


def test_set_after_torch_is_recorded_as_too_late(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(cpu_threads, "_state", {"set_by_us": False, "too_late": False})
    assert "torch" in sys.modules  # this test process imported it
    assert cpu_threads.prefer_passive_wait() is True
    assert cpu_threads.record(3) == {"threads": 3, "omp_wait_policy": "OpenMP's default",
                                     "omp_wait_policy_source": "too late: torch was imported first"}


@pytest.mark.parametrize("text", ["0", "-2", "two", "1.5"])
def test_threads_flag_refuses_non_counts(text, capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:  # argparse's own refusal
        dm.main([*TINY, "--out", str(tmp_path / "r"), "--threads", text])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--threads" in lines[0]
    assert not (tmp_path / "r").exists()


def _unset(environ):
    """``environ`` without the thread variables (this process may have set them: importing a
    command-line module calls prefer_passive_wait)."""
    return {k: v for k, v in environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}


def _run(tmp_path, extra, env):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "baselines/dm.py", *TINY, "--out", str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**_unset(os.environ), **env})
    assert done.returncode == 0, done.stderr
    first = (done.stdout + done.stderr).strip().splitlines()[0]
    return first, json.loads((out / "config.json").read_text())


def test_a_run_prints_and_records_its_threads_and_wait_policy(tmp_path):
    first, config = _run(tmp_path, ["--threads", "1"], {})
    assert "threads 1 (--threads), OpenMP wait passive (ours)" in first
    assert config["environment"]["omp_wait_policy"] == "passive"
    assert config["environment"]["omp_wait_policy_source"] == "ours"
    assert config["environment"]["threads"] == 1
    assert "threads" not in config and "threads" not in config["sources"]  # not a setting


def test_the_log_line_names_the_users_choices(monkeypatch):
    monkeypatch.setattr(cpu_threads, "_state", {"set_by_us": False, "too_late": False})
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads.describe(1, given=False) == (
        "threads 1 (OMP_NUM_THREADS), OpenMP wait active (OMP_WAIT_POLICY)")
    assert cpu_threads.describe(2, given=True).startswith("threads 2 (--threads)")
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu_threads.describe(2, given=False).startswith("threads 2 (torch's default)")


def test_apply_threads_sets_and_reports_the_count():
    before = torch.get_num_threads()
    try:
        assert cpu_threads.apply_threads(1) == 1 == torch.get_num_threads()
        assert cpu_threads.apply_threads(None) == 1  # None keeps the count
    finally:
        torch.set_num_threads(before)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_busy_workers_run_inside_the_block_and_are_stopped_after_it_even_on_error():
    with pytest.raises(RuntimeError):
        with contention.busy_workers(2) as pids:
            assert len(pids) == 2 and all(_alive(p) for p in pids)
            raise RuntimeError("measurement failed")
    assert not any(_alive(p) for p in pids)
    with contention.busy_workers(0) as none:
        assert none == []


def test_contention_table_ratios_by_hand():
    names = [c.name for c in contention.CONDITIONS]
    seconds = dict(zip(names, [2.0, 2.5, 4.4, 6.0, 4.0]))
    results = {n: {"host (IPC 10)": s} for n, s in seconds.items()}
    text = contention.table(results, 1)
    row = [line for line in text.splitlines() if line.startswith("| host")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:6] == ["2.000", "2.500", "4.400", "6.000", "4.000"]
    assert cells[6] == "1.10"  # busy / busy, 1 thread = 4.4 / 4.0
    assert cells[7] == "0.80"  # quiet / quiet, active wait = 2.0 / 2.5


def test_compare_runs_each_condition_with_its_environment_and_flags(tmp_path, monkeypatch):
    calls = []

    def fake_call(cmd, env):
        calls.append((cmd, env["OMP_WAIT_POLICY"]))
        out = cmd[cmd.index("--json") + 1]
        threads = cmd[cmd.index("--threads") + 1] if "--threads" in cmd else None
        contend = int(cmd[cmd.index("--contend") + 1])
        seconds = 1.0 + contend + (0.5 if threads else 0.0)
        Path(out).write_text(json.dumps({"rows": [{"variant": "host", "ipc": 1,
                                                   "seconds_median": seconds}]}))
        return 0

    monkeypatch.setattr(contention.subprocess, "call", fake_call)
    assert contention.compare("bench.py", ["--ipc", "1"], 3) == 0
    assert [(c[c.index("--contend") + 1], "--threads" in c, p) for c, p in calls] == [
        ("0", False, "PASSIVE"), ("0", False, "ACTIVE"), ("3", False, "PASSIVE"),
        ("3", False, "ACTIVE"), ("3", True, "PASSIVE")]
    assert all(c[1:3] == ["bench.py", "--ipc"] for c, _ in calls)
