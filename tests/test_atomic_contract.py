"""Atomic writes: where and under which name the temporary file lives, what a failure midway
leaves behind, permissions, and the umask probe."""
import os
import re
import stat

import pytest
import torch

from dm_plugins import atomic


def _process_umask():
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def test_read_umask_returns_the_process_umask_and_restores_it():
    old = os.umask(0o027)
    try:
        assert atomic._read_umask() == 0o027
        assert _process_umask() == 0o027           # unchanged by the probe
        os.umask(0o002)
        assert atomic._read_umask() == 0o002
        assert _process_umask() == 0o002
    finally:
        os.umask(old)


def test_temp_file_is_hidden_next_to_the_target_and_named_after_it(tmp_path):
    target = tmp_path / "run" / "state.json"
    target.parent.mkdir()
    (target.parent / "other.txt").write_text("x")
    seen = []

    def write(f):
        f.write(b"new")
        seen.append(sorted(os.listdir(target.parent)))

    atomic._atomic_write(target, write)
    entries, = seen
    extra = [e for e in entries if e != "other.txt"]
    assert len(extra) == 1, entries                 # the temp file, in the target's directory
    assert re.fullmatch(r"\.state\.json\.[^/]+\.tmp", extra[0]), extra[0]
    assert sorted(os.listdir(target.parent)) == ["other.txt", "state.json"]   # renamed away
    assert target.read_bytes() == b"new"


def test_temp_file_lives_in_the_targets_directory_not_the_cwd_or_tmp(tmp_path, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(); elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("TMPDIR", str(elsewhere))
    monkeypatch.setattr("tempfile.tempdir", None)
    during = {}

    def write(f):
        f.write(b"1")
        during["work"] = os.listdir(work)
        during["elsewhere"] = os.listdir(elsewhere)

    atomic._atomic_write(work / "a.bin", write)
    assert len(during["work"]) == 1 and during["work"][0].endswith(".tmp")
    assert during["elsewhere"] == []
    assert os.listdir(work) == ["a.bin"]


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_failure_midway_keeps_the_old_file_and_removes_the_temp(tmp_path, exc_type):
    target = tmp_path / "x.pt"
    target.write_bytes(b"old contents")

    def write(f):
        f.write(b"partial" * 1000)
        f.flush()
        raise exc_type("disk full")

    with pytest.raises(exc_type, match="^disk full$"):
        atomic._atomic_write(target, write)
    assert target.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["x.pt"]


def test_written_files_get_the_permissions_of_a_plain_open(tmp_path):
    target = tmp_path / "t.json"
    atomic.atomic_write_json(target, [1, 2])
    expected = 0o666 & ~_process_umask()
    assert stat.S_IMODE(os.stat(target).st_mode) == expected
    assert target.read_text() == "[\n  1,\n  2\n]\n"


def test_torch_save_roundtrip_and_bytes(tmp_path):
    target = tmp_path / "deep" / "er" / "t.pt"
    atomic.atomic_torch_save(target, {"a": torch.arange(3)})
    assert torch.equal(torch.load(target)["a"], torch.arange(3))
    atomic.atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert os.listdir(target.parent) == ["t.pt"]
