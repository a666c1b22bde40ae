"""Every disk-full path, for every errno and message it handles.

* :mod:`dm_plugins.atomic`: :class:`DiskFull` is "an atomic write [that] ran out of space
  (ENOSPC or a quota)"; ``torch.save`` "reports a failed write of its zip container as a
  RuntimeError" (this torch: ``unexpected pos N vs M``, older ones ``PytorchStreamWriter failed
  writing file ...``), a disk-full only when the disk is (nearly) full; anything else is
  re-raised as it was, and the previous file is intact either way;
* :func:`baselines.harness.paths.is_disk_full`: ENOSPC and EDQUOT (and so DiskFull);
* the run driver: such an error ends a run with exit 3 and one line, any other OSError is not
  swallowed.
"""
import errno
import os
import shutil

import pytest
import torch

from baselines import dm
from baselines.harness import driver
from baselines.harness.driver import DISK_FULL, disk_full_message
from baselines.harness.guards import StopRequest
from baselines.harness.paths import is_disk_full
from dm_plugins import atomic
from dm_plugins.atomic import DiskFull, atomic_torch_save, atomic_write_bytes

# what torch raises when its zip writer cannot write (this version, then older ones)
TORCH_WRITE_ERRORS = ["[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598",
                      "[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed "
                      "writing file data/0: file write failed"]


def _free(monkeypatch, free):
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(atomic.shutil, "disk_usage",
                        lambda path: usage._replace(free=free))


def _failing(exc, payload=b"partial" * 100):
    def write(f):
        f.write(payload)
        f.flush()
        raise exc
    return write


def _only_the_old_file(target):
    assert target.read_bytes() == b"old"
    assert os.listdir(target.parent) == [target.name]       # no temp file left


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_an_out_of_space_errno_is_a_disk_full_naming_the_file(code, tmp_path):
    # catches: a quota (EDQUOT) not recognised, or the byte count / file name lost
    target = tmp_path / "state.pt"
    target.write_bytes(b"old")
    with pytest.raises(DiskFull) as info:
        atomic._atomic_write(target, _failing(OSError(code, os.strerror(code))))
    assert info.value.filename == str(target) and info.value.written == 700
    assert info.value.errno == errno.ENOSPC and is_disk_full(info.value)
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == code
    _only_the_old_file(target)


@pytest.mark.parametrize("code", [errno.EIO, errno.EACCES, errno.EROFS, errno.ENOENT])
def test_other_errnos_are_re_raised_as_they_were(code, tmp_path):
    # catches: every OSError taken for a full disk
    target = tmp_path / "state.pt"
    target.write_bytes(b"old")
    error = OSError(code, os.strerror(code))
    with pytest.raises(OSError) as info:
        atomic._atomic_write(target, _failing(error))
    assert info.value is error and not isinstance(info.value, DiskFull)
    _only_the_old_file(target)


@pytest.mark.parametrize("text", TORCH_WRITE_ERRORS)
def test_torchs_writer_error_on_a_full_disk_is_a_disk_full(text, tmp_path, monkeypatch):
    # catches: a torch writer message that is not recognised (the "unexpected pos" text of
    # torch 2.x, which names no write), or the free-space test inverted
    target = tmp_path / "state.pt"
    target.write_bytes(b"old")
    _free(monkeypatch, 1000)                                     # < 1 MiB left
    with pytest.raises(DiskFull) as info:
        atomic._atomic_write(target, _failing(RuntimeError(text)))
    assert info.value.filename == str(target) and str(info.value.__cause__) == text
    _only_the_old_file(target)


@pytest.mark.parametrize("text", TORCH_WRITE_ERRORS)
def test_torchs_writer_error_with_space_left_is_re_raised(text, tmp_path, monkeypatch):
    # catches: every torch writer error called a full disk (or the 1 MiB bound moved up)
    target = tmp_path / "state.pt"
    target.write_bytes(b"old")
    _free(monkeypatch, 1 << 20)                                  # exactly 1 MiB: not full
    error = RuntimeError(text)
    with pytest.raises(RuntimeError) as info:
        atomic._atomic_write(target, _failing(error))
    assert info.value is error
    _only_the_old_file(target)


@pytest.mark.parametrize("code,full", [(errno.EDQUOT, True), (errno.ENOSPC, True),
                                       (errno.EIO, False)])
def test_torchs_writer_error_over_the_files_own_oserror_is_judged_by_that_errno(
        code, full, tmp_path, monkeypatch):
    """What torch 2 raises when the file object's write fails: RuntimeError('unexpected pos')
    with the OSError as its context. Under a quota the disk still has free space."""
    # catches: a quota under torch's writer (free space left) reported as a traceback
    target = tmp_path / "state.pt"
    target.write_bytes(b"old")
    _free(monkeypatch, 10 << 30)

    def write(f):
        f.write(b"partial")
        try:
            raise OSError(code, os.strerror(code))
        except OSError:
            raise RuntimeError(TORCH_WRITE_ERRORS[0])
    with pytest.raises(DiskFull if full else RuntimeError):
        atomic._atomic_write(target, write)
    _only_the_old_file(target)


def test_other_runtime_errors_and_an_unreadable_disk_usage_are_re_raised(tmp_path,
                                                                        monkeypatch):
    # catches: any RuntimeError on a full disk called a disk-full; disk_usage's own error leaking
    target = tmp_path / "state.pt"
    target.write_bytes(b"old")
    _free(monkeypatch, 0)
    error = RuntimeError("CUDA error: an illegal memory access was encountered")
    with pytest.raises(RuntimeError) as info:
        atomic._atomic_write(target, _failing(error))
    assert info.value is error

    def no_usage(path):
        raise OSError(errno.EIO, "cannot stat")
    monkeypatch.setattr(atomic.shutil, "disk_usage", no_usage)
    error = RuntimeError(TORCH_WRITE_ERRORS[0])
    with pytest.raises(RuntimeError) as info:
        atomic._atomic_write(target, _failing(error))
    assert info.value is error
    _only_the_old_file(target)


@pytest.mark.parametrize("size", [10, 100_000])
def test_torch_save_onto_a_device_that_is_full_is_a_disk_full(size, tmp_path, monkeypatch):
    """The real thing: torch's own writer on /dev/full (every write ENOSPC). A small object
    fails in the final flush, a large one inside torch's writer."""
    # catches: the error of either place escaping as a RuntimeError/OSError traceback
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    target = tmp_path / "state.pt"
    target.write_bytes(b"old")
    fdopen = os.fdopen

    def onto_dev_full(fd, mode):
        fdopen(fd, mode).close()
        return open("/dev/full", mode)
    monkeypatch.setattr(atomic.os, "fdopen", onto_dev_full)
    with pytest.raises(DiskFull) as info:
        atomic_torch_save(target, {"a": torch.zeros(size)})
    assert info.value.filename == str(target)
    _only_the_old_file(target)


def test_disk_full_keeps_its_own_numbers_when_raised_inside_a_write(tmp_path):
    # catches: a DiskFull raised by a nested writer wrapped again (losing its byte count)
    target = tmp_path / "x.bin"
    inner = DiskFull("/elsewhere/inner.bin", 12)
    with pytest.raises(DiskFull) as info:
        atomic._atomic_write(target, _failing(inner))
    assert info.value is inner and info.value.written == 12
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("exc,full", [
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
    (DiskFull("/x", 3), True),
    (OSError(errno.EIO, "Input/output error"), False),
    (OSError(errno.EROFS, "Read-only file system"), False),
    (OSError("no errno"), False),
    (RuntimeError("No space left on device"), False),
])
def test_is_disk_full_for_every_errno_it_handles(exc, full):
    # catches: EDQUOT dropped from the tuple, or a non-OSError with the same text accepted
    assert is_disk_full(exc) is full


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_the_driver_ends_a_run_on_a_full_disk_with_exit_3_and_one_line(code, tmp_path,
                                                                       monkeypatch, capsys):
    # catches: the quota errno printed as a traceback, or the exit code 2/1 instead of 3
    target = tmp_path / "deep" / "synthetic.pt"

    def full(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(target))
    monkeypatch.setattr(driver, "run", full)
    assert dm.main(["--out", str(tmp_path / "run"), "--no-progress"]) == DISK_FULL
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: no space left on device writing {target} (")
    assert err.endswith("free there); free some space") and "\n" not in err


def test_the_driver_does_not_swallow_other_os_errors(tmp_path, monkeypatch):
    # catches: every OSError turned into the disk-full exit
    def broken(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error", "x")
    monkeypatch.setattr(driver, "run", broken)
    with pytest.raises(OSError, match="Input/output error"):
        dm.main(["--out", str(tmp_path / "run"), "--no-progress"])


def test_the_disk_full_line_for_each_state_of_the_run(tmp_path, monkeypatch):
    # catches: the wrong 'kept' clause for a state, or the byte count shown when unknown
    from baselines.harness import paths
    monkeypatch.setattr(paths, "free_bytes", lambda where: 3 << 20)

    class Dir:
        path = tmp_path / "run"
        checkpoint_path = tmp_path / "run" / "checkpoint.pt"
    stop = StopRequest()
    nameless = OSError(errno.ENOSPC, "No space left on device")
    assert disk_full_message(nameless, stop, "dm.py", "python") == \
        "no space left on device writing a file (3.0 MiB free there); free some space"
    full = DiskFull(str(tmp_path / "run" / "synthetic.pt"), 5 << 19)
    head = f"no space left on device writing {full.filename} after 2.5 MiB of it (3.0 MiB free " \
           f"there); "
    resume = f"; free some space and continue with: python dm.py --resume {Dir.path}"
    stop.run_dir = Dir()
    assert disk_full_message(full, stop, "dm.py", "python") == \
        head + "no checkpoint was written yet" + resume
    Dir.path.mkdir()
    Dir.checkpoint_path.write_bytes(b"x")
    assert disk_full_message(full, stop, "dm.py", "python") == \
        head + f"its checkpoint {Dir.checkpoint_path} is kept" + resume
    stop.checkpoint = 4
    assert disk_full_message(full, stop, "dm.py", "python") == \
        head + f"the checkpoint after 4 iterations ({Dir.checkpoint_path}) is kept" + resume
    assert "after" not in disk_full_message(DiskFull("/x/y", 0), StopRequest(), "p", "l")
    atomic_write_bytes(tmp_path / "ok.bin", b"1")            # the writer itself still works
