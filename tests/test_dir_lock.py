"""One process per run or ablation directory: the lock file and the commands that take it."""
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest

from baselines import ablate, dm
from baselines.harness.dir_lock import DirectoryInUse, DirectoryLock
from dm_plugins.loop import DMHost
from tests.conftest import killed_at
from tests.test_ablate import TINY as ABLATION_TINY
from tests.test_reliability import TINY, one_line_error


@pytest.fixture()
def live_pid():
    """The pid of a running process that is not this one."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield child.pid
    child.kill()
    child.wait()


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_lock(directory, pid, host=None):
    (directory / ".lock").write_text(json.dumps(
        {"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-01 00:00:00"}))


def test_a_lock_is_held_until_released(tmp_path):
    lock = DirectoryLock(tmp_path).acquire()
    owner = json.loads((tmp_path / ".lock").read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]   # no temp file left
    lock.release()
    assert not (tmp_path / ".lock").exists()
    lock.release()                                                   # a second release: nothing


def test_a_live_owner_or_another_host_is_refused_a_dead_owner_is_taken_over(tmp_path, live_pid):
    write_lock(tmp_path, live_pid)
    with pytest.raises(DirectoryInUse, match=f"in use by process {live_pid} .*delete .*lock"):
        DirectoryLock(tmp_path).acquire()
    write_lock(tmp_path, live_pid, host="elsewhere")
    with pytest.raises(DirectoryInUse, match="elsewhere"):
        DirectoryLock(tmp_path).acquire()
    write_lock(tmp_path, dead_pid())
    with DirectoryLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    (tmp_path / ".lock").write_text("{not json")                     # unreadable: stale
    with DirectoryLock(tmp_path):
        pass


def _contend(directory, start, results):
    start.wait()
    try:
        DirectoryLock(directory).acquire()   # held until the process exits
        results.put("won")
        time.sleep(1.0)
    except DirectoryInUse:
        results.put("refused")


def test_of_processes_racing_for_a_lock_exactly_one_wins(tmp_path):
    context = multiprocessing.get_context("fork")
    start, results = context.Event(), context.Queue()
    racers = [context.Process(target=_contend, args=(tmp_path, start, results))
              for _ in range(6)]
    for p in racers:
        p.start()
    start.set()
    outcomes = sorted(results.get(timeout=30) for _ in racers)
    for p in racers:
        p.join(timeout=30)
    assert outcomes == ["refused"] * 5 + ["won"]


def test_a_run_directory_in_use_is_refused_and_the_lock_is_gone_after_a_run(tmp_path, capsys,
                                                                           live_pid):
    out = tmp_path / "cut"
    with killed_at(DMHost, 3):
        assert dm.main(TINY + ["--iterations", "4", "--out", str(out)]) == 130
    assert not (out / ".lock").exists()                    # released when interrupted
    capsys.readouterr()
    write_lock(out, live_pid)                              # another process resumes it
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    one_line_error(capsys, dm.main, ["--resume", str(out), "--no-progress"],
                   f"in use by process {live_pid}")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before   # nothing touched
    write_lock(out, dead_pid())                            # it was killed: the lock is stale
    assert dm.main(["--resume", str(out), "--no-progress"]) == 0
    assert (out / "synthetic.pt").exists() and not (out / ".lock").exists()


def test_a_new_run_in_a_directory_being_created_by_another_process_is_refused(
        tmp_path, capsys, live_pid):
    out = tmp_path / "new"
    out.mkdir()
    write_lock(out, live_pid)
    one_line_error(capsys, dm.main, TINY + ["--out", str(out)], "in use")
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_a_second_ablation_runner_on_the_same_directory_is_refused(tmp_path, capsys, live_pid):
    out = tmp_path / "abl"
    out.mkdir()
    write_lock(out, live_pid)             # a runner that has just taken the new directory
    argv = ["--method", "dm", "--subsets", "none", "--seeds", "0", "--out", str(out),
            *ABLATION_TINY]
    one_line_error(capsys, ablate.main, argv, "ablation directory", f"process {live_pid}")
    assert sorted(p.name for p in out.iterdir()) == [".lock"]   # no cell started
