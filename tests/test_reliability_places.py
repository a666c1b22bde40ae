"""Reliability, round two: the places a run writes (files in the way, read-only places, a
non-empty folder that is not a run, full disks), protected config.json on --resume, refusals
that leave nothing behind, degenerate settings, and a NaN that appears after a checkpoint."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from baselines import coreset, dm, evaluate, idm
from baselines.harness import paths
from baselines.harness.driver import DISK_FULL, space_needed
from baselines.harness.synset import load_synset
from dm_plugins.atomic import DiskFull, atomic_torch_save
from dm_plugins.loop import DMHost
from tests.test_reliability import TINY, one_line_error


def test_out_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "F").write_text("x")
    one_line_error(capsys, dm.main, TINY + ["--out", str(tmp_path / "F" / "run")],
                   "--out", "a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["F"]


def test_a_non_empty_folder_that_is_not_a_run_is_refused(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    one_line_error(capsys, dm.main, TINY + ["--out", str(folder)], "not a run", "notes.txt")
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert dm.main(TINY + ["--out", str(empty)]) == 0     # an empty folder is fine


def _read_only(monkeypatch, root: Path):
    """os.access answers as on a read-only file system for ``root`` and below (the tests run
    as any user; a real read-only mount is tried in the next test when allowed)."""
    real = os.access

    def access(path, mode, *a, **kw):
        if Path(os.path.abspath(path)).is_relative_to(root) and mode & os.W_OK:
            return False
        return real(path, mode, *a, **kw)
    monkeypatch.setattr(paths.os, "access", access)


def test_read_only_out_and_experts_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    _read_only(monkeypatch, ro)
    one_line_error(capsys, dm.main, TINY + ["--out", str(ro / "run")], "not writable")
    one_line_error(capsys, dm.main, TINY + ["--plugins", "ptm", "--experts", str(ro / "ex"),
                                            "--out", str(tmp_path / "r")], "--experts",
                   "not writable")
    assert list(ro.iterdir()) == [] and not (tmp_path / "r").exists()


def test_a_real_read_only_mount_when_this_machine_allows_one(tmp_path, capsys):
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "none", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a read-only tmpfs is not allowed here")
    try:
        one_line_error(capsys, dm.main, TINY + ["--out", str(mount / "run")], "not writable")
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_refused_expert_cache_leaves_no_runs_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "ex"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    code = dm.main(TINY + ["--plugins", "ptm", "--experts", str(bad)])
    assert code == 2 and not (tmp_path / "runs").exists(), capsys.readouterr().err


def test_too_little_free_space_is_refused_at_the_start(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(paths, "free_bytes", lambda path: 1 << 20)
    one_line_error(capsys, dm.main, TINY + ["--out", str(tmp_path / "run")], "1.0 MiB free",
                   "needs about")
    assert not (tmp_path / "run").exists()


def test_space_needed_counts_checkpoints_set_and_experts():
    class D:
        num_classes, channels, image_size = 10, 3, 32
    run_dir, experts = space_needed({"ipc": 10, "arch": "convnet"}, D, missing_experts=2)
    stored = 10 * 10 * 3 * 32 * 32 * 4
    assert run_dir == 7 * stored + (2 << 20)
    assert experts == 2 * 2 * 4 * 320010 + (1 << 20)   # ConvNet-3 on CIFAR-10: 320,010 params


def test_a_full_disk_mid_run_keeps_the_last_checkpoint_and_names_the_resume(tmp_path, capsys,
                                                                             monkeypatch):
    from baselines.harness import runs
    out = tmp_path / "run"
    saves = {"n": 0}
    real_save = runs.atomic_torch_save

    def save(path, state):  # the second checkpoint finds the disk full
        saves["n"] += 1
        if saves["n"] == 2:
            raise DiskFull(str(path), 1234)
        real_save(path, state)
    monkeypatch.setattr(runs, "atomic_torch_save", save)
    args = TINY + ["--iterations", "6", "--checkpoint-every", "2"]
    assert dm.main(args + ["--out", str(out)]) == DISK_FULL
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no space left on device writing ") and "\n" not in err
    assert "checkpoint.pt" in err and "after 2 iterations" in err
    assert f"--resume {out}" in err
    assert torch.load(out / "checkpoint.pt", weights_only=False)["iteration"] == 2
    monkeypatch.setattr(runs, "atomic_torch_save", real_save)
    assert dm.main(["--resume", str(out), "--no-progress"]) == 0
    assert dm.main(args + ["--out", str(tmp_path / "straight")]) == 0
    assert torch.equal(load_synset(out / "synthetic.pt").images,
                       load_synset(tmp_path / "straight" / "synthetic.pt").images)


def test_an_atomic_write_that_runs_out_of_space_names_its_file(tmp_path, monkeypatch):
    import errno

    def full(obj, f):
        f.write(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    target = tmp_path / "state.pt"
    target.write_bytes(b"old")
    with pytest.raises(DiskFull) as info:
        atomic_torch_save(target, {})
    assert info.value.filename == str(target) and info.value.written == 10
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_an_edited_config_is_refused_on_resume_naming_the_keys(tmp_path, capsys):
    out = tmp_path / "run"
    assert dm.main(TINY + ["--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    config["plugins"], config["batch_real"] = ["cap"], 4
    (out / "config.json").write_text(json.dumps(config))
    log = (out / "run.log").read_text()
    one_line_error(capsys, dm.main, ["--resume", str(out)], "changed since the run started",
                   "batch_real, plugins")
    assert (out / "run.log").read_text() == log          # a refused resume writes nothing


def test_a_config_missing_a_setting_is_refused_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert dm.main(TINY + ["--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    del config["lr_img"]
    (out / "config.json").write_text(json.dumps(config))
    one_line_error(capsys, dm.main, ["--resume", str(out)], "lacks lr_img")


def test_a_nan_after_a_checkpoint_stops_with_the_last_finite_checkpoint(tmp_path, capsys,
                                                                        monkeypatch):
    real_step = DMHost.step

    def step(self, t=None):  # iteration 3 turns the images non-finite
        metrics = real_step(self, t)
        if metrics["iteration"] == 3:
            with torch.no_grad():
                self.syn.view(-1)[0] = float("nan")
        return metrics
    monkeypatch.setattr(DMHost, "step", step)
    out = tmp_path / "run"
    one_line_error(capsys, dm.main, TINY + ["--iterations", "6", "--out", str(out)],
                   "non-finite", "after 2 iterations")
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["iteration"] == 2 and torch.isfinite(state["host"]["syn"]).all()
    monkeypatch.setattr(DMHost, "step", real_step)
    assert dm.main(["--resume", str(out), "--no-progress"]) == 0
    assert (out / "synthetic.pt").exists()


def test_expert_index_outside_the_pool_is_refused(tmp_path, capsys):
    from tests.conftest import random_stand_in_experts
    from baselines.harness.datasets import load_dataset
    pool, _ = random_stand_in_experts(load_dataset("digits"), "convnet", num_experts=1, seed=0)
    directory = tmp_path / "pool"
    pool.save(directory)
    one_line_error(capsys, coreset.main, ["--method", "herding", "--experts", str(directory),
                                          "--expert-index", "5", "--ipc", "1", "--out",
                                          str(tmp_path / "c")], "--expert-index 5",
                   "holds 1 expert")
    assert not (tmp_path / "c").exists()


def test_idm_without_queue_training_is_refused(tmp_path, capsys):
    one_line_error(capsys, idm.main, TINY + ["--model-train-steps", "0", "--out",
                                             str(tmp_path / "r")], "--model-train-steps")


def test_evaluate_refuses_an_empty_set_and_a_directory_in_the_way(tmp_path, capsys):
    run = tmp_path / "run"
    assert dm.main(TINY + ["--out", str(run)]) == 0
    (run / "evaluation.json").mkdir()
    one_line_error(capsys, evaluate.main, [str(run / "synthetic.pt"), "--runs", "1",
                                           "--epochs", "1"], "is a directory")
    (run / "evaluation.json").rmdir()
    synset = load_synset(run / "synthetic.pt")
    from baselines.harness.synset import save_synset
    empty = tmp_path / "empty.pt"
    save_synset(empty, synset.images[:0], synset.labels[:0], synset.meta)
    one_line_error(capsys, evaluate.main, [str(empty), "--runs", "1", "--epochs", "1"],
                   "no images")


def test_coreset_out_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "F").write_text("x")
    one_line_error(capsys, coreset.main, ["--method", "random", "--ipc", "1", "--out",
                                          str(tmp_path / "F" / "run")], "a file")
