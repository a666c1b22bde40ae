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


def test_passive_wait_only_when_fewer_cores_are_free_than_threads_and_the_user_chose_none():
    env = {}
    assert cpu_threads.prefer_passive_wait(env, others=1, cores=2) is True  # 1 free, 2 threads
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    for others in (0, None):  # quiet, or no load reading: OpenMP's default stays
        env = {}
        assert cpu_threads.prefer_passive_wait(env, others=others, cores=2) is False
        assert env == {}
    env = {"OMP_NUM_THREADS": "1"}  # one thread never waits for another
    assert cpu_threads.prefer_passive_wait(env, others=3, cores=2) is False
    env = {"OMP_NUM_THREADS": "2"}
    assert cpu_threads.prefer_passive_wait(env, others=3, cores=4) is True  # 1 free < 2
    env = {"OMP_NUM_THREADS": "2"}
    assert cpu_threads.prefer_passive_wait(env, others=2, cores=4) is False  # 2 free
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert cpu_threads.prefer_passive_wait(env, others=5, cores=2) is False
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}
    env = {"OMP_WAIT_POLICY": "  "}  # blank is unset
    assert cpu_threads.prefer_passive_wait(env, others=1, cores=2) is True
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"


def test_other_running_tasks_reads_the_runnable_count_without_this_process(tmp_path,
                                                                            monkeypatch):
    import builtins
    readings = iter(["0.5 0.4 0.3 3/200 99\n", "0.5 0.4 0.3 1/200 99\n",
                     "0.5 0.4 0.3 3/200 99\n"])
    real_open = builtins.open

    def fake_open(path, *a, **k):
        if path == "/proc/loadavg":
            target = tmp_path / "loadavg"
            target.write_text(next(readings))
            return real_open(target, *a, **k)
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)
    assert cpu_threads.other_running_tasks(readings=3, interval=0) == 2  # median of 2, 0, 2

    def no_proc(path, *a, **k):
        if path == "/proc/loadavg":
            raise FileNotFoundError(path)
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", no_proc)
    assert cpu_threads.other_running_tasks(readings=2, interval=0) is None


def test_wait_policy_names_who_chose_it(monkeypatch):
    monkeypatch.setattr(cpu_threads, "_state", {"set_by_us": False, "too_late": False, "why": ""})
    assert cpu_threads.wait_policy({}) == ("OpenMP's default", "unset")
    assert cpu_threads.wait_policy({"OMP_WAIT_POLICY": "ACTIVE"}) == ("active", "OMP_WAIT_POLICY")
    monkeypatch.setattr(cpu_threads, "_state", {"set_by_us": False, "too_late": False,
                                                "why": "0 other running task(s) on 2 core(s)"})
    assert cpu_threads.wait_policy({}) == ("OpenMP's default",
                                           "ours: 0 other running task(s) on 2 core(s)")
    monkeypatch.setattr(cpu_threads, "_state", {"set_by_us": True, "too_late": False,
                                                "why": "1 other running task(s) on 2 core(s)"})
    assert cpu_threads.wait_policy({"OMP_WAIT_POLICY": "PASSIVE"}) == (
        "passive", "ours: 1 other running task(s) on 2 core(s)")
    monkeypatch.setattr(cpu_threads, "_state", {"set_by_us": True, "too_late": True, "why": ""})
    assert cpu_threads.wait_policy({"OMP_WAIT_POLICY": "PASSIVE"})[1].startswith("too late")


def test_set_after_torch_is_recorded_as_too_late(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu_threads, "_state", {"set_by_us": False, "too_late": False, "why": ""})
    assert "torch" in sys.modules  # this test process imported it
    assert cpu_threads.prefer_passive_wait(others=1, cores=2) is True
    assert cpu_threads.record(3) == {"threads": 3, "omp_wait_policy": "OpenMP's default",
                                     "omp_wait_policy_source": "too late: torch was imported first"}


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


@pytest.mark.skipif(not Path("/proc/loadavg").is_file(), reason="reads /proc/loadavg")
def test_a_run_beside_a_busy_core_waits_passively_and_says_so(tmp_path):
    with contention.BusyWorkers(1):  # started first, as another user's job would be
        first, config = _run(tmp_path, [], {"OMP_NUM_THREADS": "2"})
    assert "threads 2 (OMP_NUM_THREADS), OpenMP wait passive (ours: " in first
    env = config["environment"]
    assert env["threads"] == 2 and env["omp_wait_policy"] == "passive"
    assert env["omp_wait_policy_source"].startswith("ours: ")
    assert "threads" not in config and "threads" not in config["sources"]  # not a setting


def test_the_log_line_names_the_users_choices(monkeypatch):
    monkeypatch.setattr(cpu_threads, "_state", {"set_by_us": False, "too_late": False, "why": ""})
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
        with contention.BusyWorkers(2) as pids:
            assert len(pids) == 2 and all(_alive(p) for p in pids)
            raise RuntimeError("measurement failed")
    assert not any(_alive(p) for p in pids)
    with contention.BusyWorkers(0) as none:
        assert none == []


def test_contention_table_ratios_by_hand():
    names = [c.name for c in contention.CONDITIONS]
    seconds = dict(zip(names, [2.06, 2.0, 4.4, 6.0, 4.0]))
    results = {n: {"host (IPC 10)": s} for n, s in seconds.items()}
    text = contention.table(results, 1)
    row = [line for line in text.splitlines() if line.startswith("| host")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:6] == ["2.060", "2.000", "4.400", "6.000", "4.000"]
    assert cells[6] == "1.10"  # busy: ours / 1 thread = 4.4 / 4.0
    assert cells[7] == "1.03"  # quiet: ours / OpenMP default = 2.06 / 2.0


def test_compare_runs_each_condition_with_its_environment_workers_and_flags(monkeypatch):
    calls, started = [], []

    def fake_call(cmd, env):
        calls.append((cmd, env.get("OMP_WAIT_POLICY"), started[-1]))
        out = cmd[cmd.index("--json") + 1]
        Path(out).write_text(json.dumps({"rows": [{"variant": "host", "ipc": 1,
                                                   "seconds_median": 1.0}]}))
        return 0

    class FakeWorkers:
        def __init__(self, count):
            self.count = count

        def __enter__(self):
            started.append(self.count)
            return []

        def __exit__(self, *exc):
            pass

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # this process's own is not passed on
    monkeypatch.setattr(contention.subprocess, "call", fake_call)
    monkeypatch.setattr(contention, "BusyWorkers", FakeWorkers)
    assert contention.compare("bench.py", ["--ipc", "1"], 3) == 0
    assert [("--threads" in c, policy, workers) for c, policy, workers in calls] == [
        (False, None, 0), (False, None, 0), (False, None, 3), (False, None, 3),
        (True, "PASSIVE", 3)]
    ours, default = calls[0][0], calls[1][0]
    assert ours[1:3] == ["bench.py", "--ipc"]  # the script decides
    assert default[1] == "-c" and "import runpy, sys, torch" in default[2]  # torch first
    assert default[3:5] == ["bench.py", "--ipc"]
    assert all("--contend" not in c for c, _, _ in calls)  # the workers are the parent's


def test_contend_is_read_from_a_raw_command_line():
    assert contention.contend_from_argv(["--ipc", "1", "--contend", "2"]) == 2
    assert contention.contend_from_argv(["--contend=3"]) == 3
    assert contention.contend_from_argv(["--contend"]) == 0
    assert contention.contend_from_argv(["--contend", "x", "--ipc", "1"]) == 0
    assert contention.contend_from_argv([]) == 0


def test_the_default_wait_child_imports_torch_before_the_script(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text("import os, sys\nfrom baselines.harness import cpu_threads\n"
                      "os.environ.pop('OMP_NUM_THREADS', None)\n"
                      "cpu_threads.prefer_passive_wait(others=1, cores=2)\n"
                      "print(cpu_threads.wait_policy()[1], sys.argv[1:])\n")
    cond = contention.CONDITIONS[1]
    assert cond.wait_policy is None  # OpenMP's default
    cmd, env = contention.child_command(str(script), ["--x"], cond, 1, str(tmp_path / "o.json"))
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("too late: torch was imported first")
    assert "'--x', '--json'" in out.stdout
