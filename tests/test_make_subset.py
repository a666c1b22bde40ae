"""baselines/make_subset.py: per-class image-folder subsets that load back as imagefolder:OUT."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from baselines import make_subset as ms
from baselines.harness.datasets import load_dataset

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--train-per-class", "5", "--test-per-class", "2"]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def quantised(dataset, images: torch.Tensor) -> torch.Tensor:
    """Pixels as 8-bit integers: round(x * 255) of the denormalised images."""
    return dataset.denormalize(images).clamp(0, 1).mul(255).round().to(torch.int16)


def run(argv, capsys):
    rc = ms.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_png_round_trip(tmp_path, capsys, digits):
    out = tmp_path / "mini"
    rc, stdout, err = run(SMALL + ["--out", str(out)], capsys)
    assert rc == 0, err
    assert "50 train + 20 test png images" in stdout and f"imagefolder:{out}" in stdout
    assert not (tmp_path / "mini.partial").exists()
    names = sorted(p.name for p in (out / "train" / "3").iterdir())
    assert names == [f"{i:04d}.png" for i in range(5)]

    back = load_dataset(f"imagefolder:{out}")
    assert back.class_names == digits.class_names
    assert back.train.class_sizes() == [5] * 10 and back.test.class_sizes() == [2] * 10
    assert (back.channels, back.image_size) == (1, 32)

    manifest = json.loads((out / "subset.json").read_text())
    assert manifest["dataset"] == "digits" and manifest["seed"] == 0
    assert manifest["class_names"] == digits.class_names
    for split in ("train", "test"):
        src, dst = getattr(digits, split), getattr(back, split)
        for c, indices in enumerate(manifest["source_indices"][split]):
            assert len(set(indices)) == len(indices)
            assert all(int(src.labels[i]) == c for i in indices)
            expected = quantised(digits, src.images[indices])
            assert torch.equal(quantised(back, dst.images_of(c)), expected), (split, c)


def test_jpg_loads_back_close(tmp_path, capsys, digits):
    out = tmp_path / "mini-jpg"
    rc, _, err = run(SMALL + ["--format", "jpg", "--seed", "3", "--out", str(out)], capsys)
    assert rc == 0, err
    assert {p.suffix for p in out.rglob("*") if p.is_file()} == {".jpg", ".json"}
    back = load_dataset(f"imagefolder:{out}")
    assert back.class_names == digits.class_names
    assert back.train.class_sizes() == [5] * 10 and back.test.class_sizes() == [2] * 10
    indices = json.loads((out / "subset.json").read_text())["source_indices"]["train"]
    diff = (quantised(back, back.train.images_of(4))
            - quantised(digits, digits.train.images[indices[4]])).abs().float()
    assert diff.mean() < 4  # JPEG quality 95: a few 8-bit levels on average


def test_same_seed_same_files_and_nested_counts(tmp_path, capsys):
    a, b, c, d = (tmp_path / n for n in "abcd")
    assert run(SMALL + ["--seed", "7", "--out", str(a)], capsys)[0] == 0
    assert run(SMALL + ["--seed", "7", "--out", str(b)], capsys)[0] == 0
    assert files_of(a) == files_of(b)
    assert run(SMALL + ["--seed", "8", "--out", str(c)], capsys)[0] == 0
    sel = lambda p: json.loads((p / "subset.json").read_text())["source_indices"]
    assert sel(c) != sel(a)
    # a larger count with the same seed picks a superset
    assert run(["--train-per-class", "9", "--test-per-class", "3", "--seed", "7", "--out", str(d)],
               capsys)[0] == 0
    for split in ("train", "test"):
        for small, large in zip(sel(a)[split], sel(d)[split]):
            assert set(small) <= set(large)


def test_existing_empty_folder_is_used(tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    rc, _, err = run(SMALL + ["--out", str(out)], capsys)
    assert rc == 0, err
    assert (out / "train").is_dir() and (out / "test").is_dir()


def _assert_one_line_error(rc, err, *words):
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, err


def test_refuses_non_empty_output_and_leaves_it_alone(tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, stdout, err = run(SMALL + ["--out", str(out)], capsys)
    _assert_one_line_error(rc, err, "not empty")
    assert stdout == ""
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"

    a_file = tmp_path / "file"
    a_file.write_text("x")
    _assert_one_line_error(*run(SMALL + ["--out", str(a_file)], capsys)[::2], "not a folder")


def test_refuses_leftover_partial(tmp_path, capsys):
    (tmp_path / "mini.partial").mkdir()
    _assert_one_line_error(*run(SMALL + ["--out", str(tmp_path / "mini")], capsys)[::2],
                           "mini.partial", "interrupted")
    assert not (tmp_path / "mini").exists()


@pytest.mark.parametrize("argv, words", [
    (["--train-per-class", "0"], ["--train-per-class", ">= 1"]),
    (["--test-per-class", "-1"], ["--test-per-class", ">= 1"]),
    (["--train-per-class", "100000"], ["--train-per-class 100000", "at most"]),
    (["--train-per-class", "1", "--test-per-class", "1000"],
     ["--test-per-class 1000", "at most"]),
    (["--dataset", "no-such-set"], ["unknown dataset"]),
])
def test_bad_inputs_fail_before_any_work(tmp_path, capsys, argv, words):
    out = tmp_path / "out"
    rc, _, err = run(argv + ["--out", str(out)], capsys)
    _assert_one_line_error(rc, err, *words)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_removes_partial(tmp_path, capsys, monkeypatch):
    from PIL import Image

    real_save, calls = Image.Image.save, []

    def flaky_save(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise OSError(28, "No space left on device")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", flaky_save)
    rc, _, err = run(SMALL + ["--out", str(tmp_path / "mini")], capsys)
    _assert_one_line_error(rc, err, "No space left")
    assert list(tmp_path.iterdir()) == []


def test_help_runs_as_a_script_from_the_repo_root():
    result = subprocess.run([sys.executable, "baselines/make_subset.py", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr
    for flag in ("--dataset", "--data-path", "--train-per-class", "--test-per-class", "--seed",
                 "--format", "--out"):
        assert flag in result.stdout
