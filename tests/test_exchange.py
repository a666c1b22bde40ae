"""Synthetic sets out to other tools and back: each export format read back equals the decoded
set (8-bit rounding for PNGs), the DM result format is what the original DM code saves, and
evaluate.py evaluates an imported set like our own."""
import json

import pytest
import torch
from PIL import Image

from baselines import dm, evaluate, export
from baselines.harness.exchange import read_dm_result, read_imagefolder
from baselines.harness.factorization import decode
from baselines.harness.synset import load_synset
from tests.test_reliability import one_line_error

TINY = ["--ipc", "2", "--factor", "2", "--iterations", "1", "--batch-real", "8",
        "--eval-runs", "0", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("exchange") / "run"
    assert dm.main(TINY + ["--out", str(out)]) == 0
    return out


def decoded(run):
    synset = load_synset(run / "synthetic.pt")
    return decode(synset.images, synset.labels, 2), synset.meta


def test_imagefolder_round_trip(run):
    (pixels, labels), meta = decoded(run)
    assert export.main([str(run), "--to", "imagefolder"]) == 0
    folder = run / "export-imagefolder"
    record = json.loads((folder / "export.json").read_text())
    assert record["images"] == 80 and record["per_class"] == [8] * 10   # 2 x 2 x 2 per class
    assert record["mean"] == meta["mean"] and record["dataset"] == "digits"
    assert meta["class_names"] == [str(c) for c in range(10)]      # runs record their names
    first = sorted((folder / "000_0").iterdir())[0]
    assert Image.open(first).size == (32, 32) and Image.open(first).mode == "L"
    images, read_labels = read_imagefolder(folder, channels=1)
    assert torch.equal(read_labels, labels)
    assert (images - pixels).abs().max() <= 0.5 / 255 + 1e-6


def test_tensor_and_dm_round_trips_are_exact(run):
    (pixels, labels), meta = decoded(run)
    mean, std = torch.tensor(meta["mean"]).view(1, -1, 1, 1), torch.tensor(meta["std"]).view(
        1, -1, 1, 1)
    assert export.main([str(run / "synthetic.pt"), "--to", "tensor"]) == 0
    images = torch.load(run / "export-tensor" / "images.pt")
    torch.testing.assert_close(images, (pixels - mean) / std)
    assert torch.equal(torch.load(run / "export-tensor" / "labels.pt"), labels)
    assert export.main([str(run), "--to", "dm"]) == 0
    path = run / "export-dm" / "res_DM_digits_ConvNet_2ipc.pt"
    saved = torch.load(path, weights_only=False)
    assert set(saved) == {"data", "accs_all_exps"}
    image_syn, label_syn = saved["data"][-1]            # how the DM code reads its results
    torch.testing.assert_close(image_syn, (pixels - mean) / std)
    back, back_labels = read_dm_result(path, meta["mean"], meta["std"])
    torch.testing.assert_close(back, pixels, atol=1e-6, rtol=0)
    assert torch.equal(back_labels, labels)


def test_export_refuses_a_non_empty_out_and_a_missing_set(run, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    one_line_error(capsys, export.main, [str(run), "--to", "tensor", "--out", str(taken)],
                   "non-empty")
    one_line_error(capsys, export.main, [str(tmp_path / "nothing"), "--to", "tensor"],
                   "synthetic")


def test_evaluate_takes_an_imported_set_like_our_own(run, capsys):
    assert export.main([str(run), "--to", "dm", "--out", str(run / "dm2")]) == 0
    args = ["--runs", "1", "--epochs", "1", "--no-progress", "--device", "cpu"]
    assert evaluate.main([str(run / "synthetic.pt")] + args) == 0
    ours = json.loads((run / "evaluation.json").read_text())["results"]["convnet"]
    assert evaluate.main([str(run / "dm2" / "res_DM_digits_ConvNet_2ipc.pt")] + args) == 0
    theirs = json.loads((run / "dm2" / "res_DM_digits_ConvNet_2ipc.evaluations" /
                         "evaluation.json").read_text())["results"]["convnet"]
    assert theirs["accuracies"] == ours["accuracies"]       # the same images, the same seeds
    one_line_error(capsys, evaluate.main, [str(run / "export-imagefolder" / "000_0")] + args,
                   "--dataset")


def test_evaluate_follows_the_run_and_report_shows_each_re_evaluation(tmp_path, capsys):
    from baselines import report
    run = tmp_path / "run"
    assert dm.main(TINY + ["--eval-runs", "2", "--eval-epochs", "2", "--out", str(run)]) == 0
    own = json.loads((run / "results.json").read_text())
    assert evaluate.main([str(run), "--no-progress", "--device", "cpu"]) == 0
    first = json.loads((run / "evaluations" / "evaluation-1.json").read_text())
    # the run's protocol, budget, seed and architectures: the run's own numbers again
    assert first["accuracies"] == own["accuracies"] and first["epochs"] == 2
    assert set(first["settings_from"].values()) == {"run"}
    assert {k for k in own if k != "expert_test_accuracy"} <= set(first)   # results.json's keys
    assert evaluate.main([str(run), "--epochs", "1", "--runs", "1", "--no-progress",
                          "--device", "cpu"]) == 0
    second = json.loads((run / "evaluations" / "evaluation-2.json").read_text())
    assert second["epochs"] == 1 and second["settings_from"]["epochs"] == "flag"
    assert json.loads((run / "results.json").read_text()) == own          # never overwritten
    capsys.readouterr()
    assert report.main([str(run), str(run / "evaluations" / "evaluation-2.json"),
                        "--out", str(tmp_path / "rep")]) == 0
    table = (tmp_path / "rep" / "report.md").read_text()
    assert f"{own['accuracy_mean']:.2f}" in table and f"{second['accuracy_mean']:.2f}" in table


class _Payload:
    """Stands for any object a pickle could build (and run code while building)."""


def test_a_dm_result_file_holding_other_objects_is_refused_not_unpickled(tmp_path):
    import pickle
    path = tmp_path / "res_evil.pt"
    torch.save({"data": [[torch.zeros(2, 3, 8, 8), torch.tensor([0, 1])]],
                "extra": _Payload()}, path)
    with pytest.raises(pickle.UnpicklingError):  # weights_only=True; weights_only=False loads it
        read_dm_result(path, (0.5,) * 3, (0.5,) * 3)
    ok = tmp_path / "res_ok.pt"
    torch.save({"data": [[torch.zeros(2, 3, 8, 8), torch.tensor([0, 1])]],
                "accs_all_exps": {"ConvNet": [0.5]}}, ok)
    images, labels = read_dm_result(ok, (0.5,) * 3, (0.5,) * 3)
    assert images.shape == (2, 3, 8, 8) and labels.tolist() == [0, 1]
