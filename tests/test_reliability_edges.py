"""Reliability, round three (issue 36): the last tracebacks and surprises of the reliability
matrix. ``--config`` values checked against their setting's type; refusals under
``--nproc-per-node`` printed once; ``evaluate.py`` on broken imported sets, and where it writes
a foreign set's evaluations; read-only ``--out`` for ``report.py`` and ``make_subset.py``; a
truncated ``grid.png``; an expert directory that grows. Each refusal is one ``error:`` line and
exit 2, checked exactly."""
import errno
import json
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from baselines import dm, evaluate, make_subset, report
from baselines.harness.datasets import load_dataset
from baselines.harness.expert_cache import load_or_train_experts
from dm_plugins.experts import training as expert_training
from tests.test_reliability import TINY, one_line_error
from tests.test_reliability_places import _read_only
from tests.test_report import _distillation_run


# -- 1. --config values are checked against their setting's type ------------------------------
BAD_CONFIG_VALUES = [
    ({"ipc": "ten"}, 'ipc must be a whole number, got "ten"'),
    ({"ipc": "10"}, "(write 10 without quotes)"),
    ({"ipc": 10.5}, "ipc must be a whole number, got 10.5"),
    ({"ipc": True}, "ipc must be a whole number, got true"),
    ({"momentum": None}, "momentum must be a number, got null"),
    ({"lr_img": "0.1"}, "(write 0.1 without quotes)"),
    ({"dsa": "maybe"}, 'dsa must be true or false (a JSON boolean), got "maybe"'),
    ({"dsa": "false"}, '"false" (write false without quotes)'),
    ({"dsa": 0}, "dsa must be true or false"),
    ({"compile": None}, "compile must be true or false"),
    ({"init": "bogus"}, 'init must be one of real, noise, got "bogus"'),
    ({"arch": 5}, "arch must be a string, got 5"),
    ({"plugins": 3}, "plugins must be a list or a comma string, got 3"),
    ({"eval_at": [0, "x"]}, "eval_at must be a list or a comma string"),
    ({"cap_end": "half"}, "cap_end must be a number"),
    ({"plm_logits": "bogus"}, "plm_logits must be one of"),
]


@pytest.mark.parametrize("content,needle", BAD_CONFIG_VALUES, ids=lambda v: json.dumps(v))
def test_a_config_value_of_the_wrong_type_is_refused_before_any_work(content, needle, tmp_path,
                                                                     capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(content))
    err = one_line_error(capsys, dm.main, TINY + ["--config", str(path), "--out",
                                                   str(tmp_path / "run")], needle)
    assert err.startswith(f"error: --config {path}: {next(iter(content))} must be ")
    assert not (tmp_path / "run").exists()
    one_line_error(capsys, dm.main, ["--config", str(path), "--print-config"], needle)


def test_config_values_of_the_right_type_still_read(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"dsa": False, "experts": None, "expert_seed": None, "ipc": 2,
                                "lr_img": 1, "eval_at": [0, 2], "plugins": "cap",
                                "eval_arch": ["convnet"], "compile": False}))
    assert dm.main(["--config", str(path), "--print-config"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["dsa"] is False and config["experts"] is None and config["expert_seed"] == 0
    assert config["lr_img"] == 1.0 and isinstance(config["lr_img"], float)
    assert config["eval_at"] == [0, 2] and config["plugins"] == ["cap"] and config["ipc"] == 2


# -- 2. refusals under --nproc-per-node print once; the resume hint names the flag ------------
@pytest.fixture()
def no_workers(monkeypatch):
    """``--nproc-per-node`` may not start its workers: the refusals come before."""
    from baselines.harness import launch

    def launch_(*args, **kwargs):
        raise AssertionError("the workers were started")
    monkeypatch.setattr(launch, "launch", launch_)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


@pytest.mark.parametrize("flags,needle", [
    (["--nproc-per-node", "11"], "11 processes for 10 classes"),
    (["--nproc-per-node", "2", "--arch", "resnet18"], "--arch resnet18 has BatchNorm"),
    (["--nproc-per-node", "2", "--lr-img", "-1"], "--lr-img must be > 0"),
    (["--nproc-per-node", "2", "--plugins", "cap,bogus"], "bogus"),
])
def test_a_refusal_under_nproc_per_node_is_one_line_before_any_worker(flags, needle, tmp_path,
                                                                      capsys, no_workers):
    one_line_error(capsys, dm.main, TINY + flags + ["--out", str(tmp_path / "run")], needle)
    assert not (tmp_path / "run").exists()


def test_a_resume_with_another_number_of_processes_is_one_line_naming_the_flag(tmp_path, capsys,
                                                                                no_workers):
    run = tmp_path / "run"
    assert dm.main(TINY + ["--print-config"]) == 0      # a run's record, without the run
    run.mkdir()
    (run / "config.json").write_text(capsys.readouterr().out)
    one_line_error(capsys, dm.main, ["--resume", str(run), "--nproc-per-node", "2"],
                   "distilled by 1 process(es), this is 2",
                   f"e.g. python baselines/dm.py --resume {run})")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "world_size": 2}))
    one_line_error(capsys, dm.main, ["--resume", str(run), "--nproc-per-node", "3"],
                   "distilled by 2 process(es), this is 3",
                   f"e.g. python baselines/dm.py --nproc-per-node 2 --resume {run}, or "
                   f"torchrun with 2 processes in all)")
    one_line_error(capsys, dm.main, ["--resume", str(run), "--nproc-per-node", "2",
                                     "--lr-img", "5"], "--lr-img 5.0 differs")
    one_line_error(capsys, dm.main, ["--resume", str(tmp_path / "none"), "--nproc-per-node",
                                     "2"], "not a run directory")


def test_the_resume_hint_names_the_flag_that_started_the_workers(tmp_path, monkeypatch):
    from baselines.harness.driver import restart
    from baselines.harness.guards import StopRequest
    from baselines.harness.launch import NPROC_ENV
    from baselines.harness.runs import RunDir
    from dm_plugins.distributed import World
    monkeypatch.delenv(NPROC_ENV, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert restart(World(0, 1), "baselines/dm.py") == ("baselines/dm.py", "python")
    assert restart(World(0, 2), "baselines/dm.py") == ("baselines/dm.py",
                                                       "torchrun --nproc-per-node 2")
    monkeypatch.setenv(NPROC_ENV, "2")
    assert restart(World(1, 2), "baselines/dm.py") == ("baselines/dm.py --nproc-per-node 2",
                                                       "python")
    stop = StopRequest()
    stop.run_dir, stop.checkpoint = RunDir(tmp_path), 2
    assert stop.message(*restart(World(0, 2), "baselines/dm.py")).endswith(
        f"continue with: python baselines/dm.py --nproc-per-node 2 --resume {tmp_path}")


# -- 3. evaluate.py on imported sets that cannot be evaluated: one line naming the file --------
EVAL = ["--dataset", "digits", "--runs", "1", "--epochs", "1", "--no-progress", "--device",
        "cpu"]


def _image_folder(root, classes=10, size=32, odd=None):
    """``root/<c>_<c>/00000.png`` for ``classes`` classes of gray ``size`` px noise images,
    the one of class ``odd`` 16 px instead."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"{c:03d}_{c}"
        folder.mkdir(parents=True)
        side = 16 if c == odd else size
        Image.fromarray(rng.integers(0, 255, (side, side), dtype=np.uint8)).save(
            folder / "00000.png")
    return root


def _dm_result(path, images=None, labels=None):
    images = torch.rand(10, 1, 32, 32) if images is None else images
    torch.save({"data": [[images, torch.arange(10) if labels is None else labels]],
                "accs_all_exps": {}}, path)
    return path


def test_an_image_folder_of_mixed_sizes_names_the_odd_image(tmp_path, capsys):
    folder = _image_folder(tmp_path / "set", odd=3)
    one_line_error(capsys, evaluate.main, [str(folder)] + EVAL,
                   f"{folder / '003_3' / '00000.png'} is 16x16 px", "are 32x32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_more_class_folders_than_classes_names_the_extra_folders(tmp_path, capsys):
    folder = _image_folder(tmp_path / "set", classes=11)
    one_line_error(capsys, evaluate.main, [str(folder)] + EVAL,
                   f"{folder} has 11 class folders but digits has 10 classes", "(010_10)")


def test_a_truncated_image_or_a_file_that_is_no_image_is_named(tmp_path, capsys):
    folder = _image_folder(tmp_path / "set")
    png = folder / "004_4" / "00000.png"
    png.write_bytes(png.read_bytes()[:60])
    one_line_error(capsys, evaluate.main, [str(folder)] + EVAL, f"cannot read image {png}")
    png.unlink()
    (folder / "004_4" / "notes.txt").write_text("not an image")
    one_line_error(capsys, evaluate.main, [str(folder)] + EVAL,
                   f"cannot read image {folder / '004_4' / 'notes.txt'}")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "no data", "labels", "shape",
                                    "3-d"])
def test_a_broken_dm_result_file_is_one_line_naming_it(damage, tmp_path, capsys):
    path = _dm_result(tmp_path / "res_DM_digits_ConvNet_1ipc.pt")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a torch file\n" * 20)
    elif damage == "no data":
        torch.save({"accs_all_exps": {}}, path)
    elif damage == "labels":
        _dm_result(path, labels=torch.arange(10) + 1)
    elif damage == "shape":
        _dm_result(path, labels=torch.arange(5))
    else:
        _dm_result(path, images=torch.rand(10, 32, 32))
    needle = {"labels": "labels range over [1, 10] but digits has classes 0..9",
              "shape": "images of shape (10, 1, 32, 32) and labels of shape (5,)",
              "no data": "is not a DM result file"}.get(damage,
                                                        "cannot be read as a DM result file")
    one_line_error(capsys, evaluate.main, [str(path)] + EVAL, str(path), needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


# -- 4. a foreign set's evaluations go beside it, never into it -------------------------------
@pytest.fixture()
def no_training(monkeypatch):
    """``evaluate.py``'s training runs replaced by a fixed result: where the files go does not
    depend on it, and the digits test set's forward passes would dominate the test's time."""
    def evaluate_synset(images, labels, *args, **kwargs):
        return {"accuracies": [float(images.mean())], "accuracy_mean": float(images.mean()),
                "accuracy_std": 0.0, "runs": 1}
    monkeypatch.setattr(evaluate, "evaluate_synset", evaluate_synset)


def test_an_image_folder_is_evaluated_twice_and_never_written_into(tmp_path, capsys, no_training):
    folder = _image_folder(tmp_path / "set")
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    assert evaluate.main([str(folder)] + EVAL) == 0
    assert evaluate.main([str(folder)] + EVAL) == 0          # it used to read our json as images
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
    out = tmp_path / "set.evaluations"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set", "set.evaluations"]
    assert sorted(p.name for p in (out / "evaluations").iterdir()) == [
        "evaluation-1.json", "evaluation-2.json"]
    index = json.loads((out / "evaluation.json").read_text())
    assert index["synset"] == str(folder.resolve()) and "convnet" in index["results"]
    assert f"wrote {out / 'evaluation.json'}" in capsys.readouterr().out


def test_dm_result_files_of_one_folder_keep_their_evaluations_apart(tmp_path, capsys, no_training):
    one = _dm_result(tmp_path / "res_one.pt")
    two = _dm_result(tmp_path / "res_two.pt", images=torch.zeros(10, 1, 32, 32))
    assert evaluate.main([str(one)] + EVAL) == 0 and evaluate.main([str(two)] + EVAL) == 0
    for path in (one, two):
        index = json.loads((tmp_path / f"{path.stem}.evaluations" / "evaluation.json")
                           .read_text())
        assert index["synset"] == str(path.resolve())
    assert not (tmp_path / "evaluation.json").exists()


def test_out_takes_the_evaluations_elsewhere_but_not_into_the_set(tmp_path, capsys, no_training):
    folder = _image_folder(tmp_path / "set")
    one_line_error(capsys, evaluate.main, [str(folder), "--out", str(folder / "ev")] + EVAL,
                   "is inside the set")
    (tmp_path / "F").write_text("x")
    one_line_error(capsys, evaluate.main, [str(folder), "--out", str(tmp_path / "F" / "ev")]
                   + EVAL, "a file")
    assert evaluate.main([str(folder), "--out", str(tmp_path / "ev")] + EVAL) == 0
    assert (tmp_path / "ev" / "evaluations" / "evaluation-1.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["F", "ev", "set"]


# -- 5. report.py and make_subset.py on a read-only --out; a truncated grid.png ---------------
@pytest.fixture()
def read_only(tmp_path, monkeypatch):
    """A folder that cannot be written: a read-only tmpfs mount where this machine allows one,
    else ``os.access`` answering as on one (the tests run as any user)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "none", str(folder)],
                             capture_output=True).returncode == 0
    if not mounted:
        _read_only(monkeypatch, folder)
    yield folder
    if mounted:
        subprocess.run(["umount", str(folder)], capture_output=True)


def test_report_to_a_read_only_out_is_one_line_before_anything_is_written(tmp_path, capsys,
                                                                          read_only):
    _distillation_run(tmp_path / "run", plugins=[])
    for out in (read_only, read_only / "rep"):
        one_line_error(capsys, report.main, [str(tmp_path / "run"), "--out", str(out)],
                       f"--out {out}: {read_only} is not writable")
    assert list(read_only.iterdir()) == []


def test_report_names_the_file_a_write_fails_on(tmp_path, capsys, monkeypatch):
    from dm_plugins import atomic
    _distillation_run(tmp_path / "run", plugins=[])

    def refused(path, data):
        raise OSError(errno.EROFS, "Read-only file system", str(path))
    monkeypatch.setattr(atomic, "atomic_write_bytes", refused)
    one_line_error(capsys, report.main, [str(tmp_path / "run"), "--out", str(tmp_path / "rep")],
                   f"cannot write {tmp_path / 'rep' / 'report.md'} (Read-only file system)")


def test_report_refuses_a_truncated_grid_naming_it(tmp_path, capsys):
    run = tmp_path / "run"
    _distillation_run(run, plugins=[])
    data = (run / "grid.png").read_bytes()
    (run / "grid.png").write_bytes(data[:len(data) // 2])
    one_line_error(capsys, report.main, [str(run), "--out", str(tmp_path / "rep")],
                   f"{run / 'grid.png'} cannot be read as an image", "delete it")
    assert not (tmp_path / "rep").exists()


def test_make_subset_to_a_read_only_out_is_one_line_naming_it(tmp_path, capsys, read_only):
    out = read_only / "sub"
    one_line_error(capsys, make_subset.main, ["--train-per-class", "1", "--test-per-class", "1",
                                              "--out", str(out)],
                   f"--out {out}: {read_only} is not writable (read-only file system")
    assert list(read_only.iterdir()) == []


def test_make_subset_names_the_file_a_write_fails_on(tmp_path, capsys, monkeypatch):
    def full(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))
    monkeypatch.setattr(Image.Image, "save", full)
    out = tmp_path / "sub"
    err = one_line_error(capsys, make_subset.main, ["--train-per-class", "1",
                                                    "--test-per-class", "1", "--out", str(out)],
                         f"--out {out}: cannot write {tmp_path / 'sub.partial' / 'train'}",
                         "(No space left on device); nothing was kept")
    assert "[Errno" not in err and list(tmp_path.iterdir()) == []


# -- 6. a larger --num-experts on an expert directory trains the missing experts into it ------
def test_a_larger_num_experts_grows_the_directory_and_keeps_its_experts(tmp_path, monkeypatch):
    """Documented (docs/reliability.md): ``--plugins ptm --num-experts 3 --experts DIR`` on a
    DIR of one expert trains experts 1 and 2 into it (what every command line calls,
    ``load_or_train_experts``): expert 0 is loaded, not trained again, and the manifest grows;
    a smaller count then uses the first experts and leaves DIR as it is."""
    monkeypatch.setattr(expert_training, "train_classifier", lambda net, *a, **k: 50.0)
    monkeypatch.setattr(expert_training, "accuracy", lambda *a, **k: 10.0)   # no real training
    digits, experts = load_dataset("digits"), tmp_path / "experts"

    def pool(n):
        lines = []
        pool, _ = load_or_train_experts(digits, "convnet", num_experts=n, epochs=1, seed=0,
                                        directory=experts, progress=False, log=lines.append)
        assert len(pool) == n
        files = {p.name: p.read_bytes() for p in experts.iterdir() if p.name != "manifest.json"}
        return files, json.loads((experts / "manifest.json").read_text()), lines
    first, manifest, _ = pool(1)
    assert manifest["num_experts"] == 1 and len(first) == 1
    grown, manifest, lines = pool(3)
    assert manifest["num_experts"] == 3 and len(grown) == 3
    assert all(grown[name] == data for name, data in first.items())       # nothing lost
    assert any("experts: training 2 of 3" in line for line in lines)
    assert not any("expert 0 trained" in line for line in lines)          # loaded, not trained
    again, manifest, lines = pool(2)
    assert manifest["num_experts"] == 3 and again == grown
    assert not any("training" in line for line in lines)
