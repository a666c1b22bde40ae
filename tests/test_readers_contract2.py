"""The JSON readers of a run's and an ablation's files, on each error they handle: a missing
file, a torn or non-UTF-8 one, a JSON value that is not an object (or lacks its key), and a
read error (EIO). Each says "None when missing or unreadable" and never raises."""
import errno
from pathlib import Path

import pytest

from baselines.harness import study_progress
from baselines.harness.ablation import read_results
from baselines.harness.snapshots import read_point

CASES = [("missing", None), ("torn", '{"iteration": 3, "accura'), ("utf8", b"\xff\xfe{}"),
         ("list", "[1, 2]"), ("string", '"text"'), ("eio", '{"iteration": 3}')]


def _write(path, content, monkeypatch):
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    real = Path.read_text

    def read_text(self, *args, **kwargs):
        if self == path and content == CASES[-1][1]:
            raise OSError(errno.EIO, "Input/output error")
        return real(self, *args, **kwargs)
    monkeypatch.setattr(Path, "read_text", read_text)


@pytest.mark.parametrize("case,content", CASES, ids=[c for c, _ in CASES])
def test_each_reader_gives_none_for_each_unreadable_file(case, content, tmp_path, monkeypatch):
    # catches: UnicodeDecodeError or OSError not caught (a traceback in --status / report), or
    # a JSON list taken for a result
    point, results, config = (tmp_path / "iter-3.json", tmp_path / "results.json",
                              tmp_path / "config.json")
    for path in (point, results, config):
        _write(path, content, monkeypatch)
    assert read_point(point) is None
    assert read_results(tmp_path) is None
    assert study_progress._read_json(config) is None


def test_the_readers_read_a_whole_object(tmp_path):
    # catches: a reader that refuses good files (the error paths above would pass vacuously)
    (tmp_path / "iter-3.json").write_text('{"iteration": 3, "accuracy_mean": 0.5}')
    (tmp_path / "iter-4.json").write_text('{"accuracy_mean": 0.5}')          # no iteration
    (tmp_path / "results.json").write_text('{"accuracy_mean": 0.5}')
    assert read_point(tmp_path / "iter-3.json") == {"iteration": 3, "accuracy_mean": 0.5}
    assert read_point(tmp_path / "iter-4.json") is None
    assert read_results(tmp_path) == {"accuracy_mean": 0.5}
    assert study_progress._read_json(tmp_path / "results.json") == {"accuracy_mean": 0.5}
