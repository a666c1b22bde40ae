"""The lock file's error paths, each errno and exception it handles (baselines/harness/dir_lock.py):
a pid that is gone (ProcessLookupError) or another user's (PermissionError), a filesystem
without hard links (the exclusive create instead, FileExistsError there too), an unreadable or
edited lock (stale), and a run's unreadable config.json (one line)."""
import errno
import json
import os

import pytest

from baselines.harness import dir_lock
from baselines.harness.dir_lock import DirectoryInUse, DirectoryLock
from baselines.harness.runs import RunDir, RunError


@pytest.mark.parametrize("raised,alive", [(None, True), (ProcessLookupError, False),
                                          (PermissionError, True)])
def test_a_pid_is_alive_unless_there_is_no_such_process(raised, alive, monkeypatch):
    # catches: another user's process (EPERM) taken for a dead one, so its lock is stolen
    def kill(pid, sig):
        assert sig == 0                                  # a probe, never a signal
        if raised is not None:
            raise raised(errno.ESRCH if raised is ProcessLookupError else errno.EPERM, "x")
    monkeypatch.setattr(dir_lock.os, "kill", kill)
    assert dir_lock._alive(12345) is alive


@pytest.mark.parametrize("code", [errno.EPERM, errno.EXDEV, errno.ENOTSUP])
def test_without_hard_links_the_lock_is_an_exclusive_create(code, tmp_path, monkeypatch):
    # catches: the fallback missing (a filesystem without links could never lock) or leaving
    # its temp file, or a second process winning the fallback too
    def no_links(src, dst):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(dir_lock.os, "link", no_links)
    first = DirectoryLock(tmp_path).acquire()
    owner = json.loads((tmp_path / ".lock").read_text())
    assert owner["pid"] == os.getpid() and first.held
    assert sorted(os.listdir(tmp_path)) == [".lock"]
    assert DirectoryLock(tmp_path)._create(b"{}") is False   # exists: the other one loses
    assert sorted(os.listdir(tmp_path)) == [".lock"]
    first.release()
    assert os.listdir(tmp_path) == []


def test_a_lock_taken_meanwhile_is_not_ours(tmp_path, monkeypatch):
    # catches: FileExistsError from os.link treated as "no hard links" (two owners at once)
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    assert DirectoryLock(tmp_path)._create(b"{}") is False
    assert sorted(os.listdir(tmp_path)) == [".lock"]            # temp file removed
    with pytest.raises(DirectoryInUse, match=r"in use by process 1 on elsewhere"):
        DirectoryLock(tmp_path).acquire()


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"pid": "12"}', '{"host": "h"}'])
def test_an_unreadable_or_edited_lock_is_stale_and_taken_over(content, tmp_path):
    # catches: a corrupt lock file that blocks the directory for ever, or a traceback (a JSON
    # list in the lock was an AttributeError)
    (tmp_path / ".lock").write_text(content)
    lock = DirectoryLock(tmp_path).acquire()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_a_lock_that_cannot_be_read_is_stale(tmp_path, monkeypatch):
    # catches: an OSError other than FileNotFoundError escaping _owner
    (tmp_path / ".lock").write_text("{}")
    lock = DirectoryLock(tmp_path)
    real = type(lock.path).read_text

    def unreadable(self, *args, **kwargs):
        if self.name == ".lock":
            raise OSError(errno.EIO, "Input/output error")
        return real(self, *args, **kwargs)
    monkeypatch.setattr(type(lock.path), "read_text", unreadable)
    assert lock._owner() == {} and not lock.in_use()
    monkeypatch.undo()
    (tmp_path / ".lock").unlink()
    assert lock._owner() is None                                 # gone: not a stale {}


@pytest.mark.parametrize("content", [None, "{torn", b"\xff\xfe"])
def test_an_unreadable_config_is_a_one_line_run_error(content, tmp_path):
    # catches: a JSONDecodeError / UnicodeDecodeError / FileNotFoundError traceback on resume
    run = RunDir(tmp_path)
    if isinstance(content, bytes):
        run.config_path.write_bytes(content)
    elif content is not None:
        run.config_path.write_text(content)
    with pytest.raises(RunError) as info:
        run.read_config()
    message = str(info.value)
    assert message.startswith(f"{run.config_path} is unreadable (")
    assert message.endswith("); start a new run") and "\n" not in message
