"""File formats holding more than one entry, read back entry by entry:

* an original DM ``res_*.pt`` holds one ``[images, labels]`` per experiment (the DM code
  appends one per experiment, ``{"data": data_save, "accs_all_exps": {...}}``);
  :func:`read_dm_result` gives "the last experiment" (``data[-1]``, what the DM code's loaders
  and DANCE's ``test.py`` read), denormalised with the given per-channel mean / std;
* an ImageFolder of several classes: classes are "the sub-folders in sorted order, as
  torchvision's ImageFolder numbers them" (sorted by name, so ``10_x`` before ``9_x``), the
  images of a class in sorted file order;
* ``metrics.jsonl``: one record per line, a torn or non-object line skipped, the others kept
  in order.
"""
import json

import pytest
import torch
from PIL import Image

from baselines.harness.exchange import export, read_dm_result, read_imagefolder
from baselines.harness.plots import read_metrics

MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.5]


def _experiment(seed, n):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, 3, 4, 4, generator=g)
    labels = torch.randperm(n, generator=g) % 3
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return pixels, labels, (pixels - m) / s


def test_a_dm_result_with_several_experiments_gives_the_last_one(tmp_path):
    # catches: data[0] read instead of data[-1], or the experiments concatenated
    experiments = [_experiment(seed, n) for seed, n in ((0, 6), (1, 9), (2, 3))]
    path = tmp_path / "res_DM_CIFAR10_ConvNet_1ipc.pt"
    torch.save({"data": [[normed, labels.int()] for _, labels, normed in experiments],
                "accs_all_exps": {"ConvNet": [0.31, 0.29, 0.30]}}, path)
    images, labels = read_dm_result(path, MEAN, STD)
    pixels, last_labels, _ = experiments[-1]
    assert images.shape == (3, 3, 4, 4) and labels.dtype == torch.int64
    torch.testing.assert_close(images, pixels, atol=1e-6, rtol=0)   # per-channel mean/std
    assert torch.equal(labels, last_labels)


def test_an_exported_dm_result_read_back_after_the_dm_code_appended_experiments(tmp_path):
    # catches: the exporter writing something other than a list of [images, labels] entries
    pixels, labels, _ = _experiment(5, 6)
    record = export(pixels, labels, tmp_path / "out", "dm", dataset="cifar10", mean=MEAN,
                    std=STD, ipc=2)
    path = tmp_path / "out" / record["file"]
    assert record["file"] == "res_DM_CIFAR10_ConvNet_2ipc.pt"
    saved = torch.load(path, weights_only=False)
    first, = saved["data"]
    more, more_labels, more_normed = _experiment(6, 3)
    saved["data"].append([more_normed, more_labels])              # as the DM code's loop does
    torch.save(saved, path)
    images, read_labels = read_dm_result(path, MEAN, STD)
    torch.testing.assert_close(images, more, atol=1e-6, rtol=0)
    assert torch.equal(read_labels, more_labels)
    saved["data"] = saved["data"][:1]
    torch.save(saved, path)
    images, read_labels = read_dm_result(path, MEAN, STD)
    torch.testing.assert_close(images, pixels, atol=1e-6, rtol=0)
    assert torch.equal(read_labels, labels)


@pytest.mark.parametrize("content", [{"data": []}, {"data": [[torch.zeros(1, 3, 4, 4)]]},
                                     {"accs_all_exps": {}}, [[torch.zeros(1), torch.zeros(1)]]])
def test_a_dm_result_without_an_experiment_is_a_one_line_error_naming_the_file(content,
                                                                                tmp_path):
    # catches: an IndexError / KeyError / TypeError traceback for an empty or foreign file
    path = tmp_path / "res_x.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match=r"^.*res_x\.pt is not a DM result file"):
        read_dm_result(path, MEAN, STD)


def _png(path, value, size=4):
    Image.fromarray(torch.full((size, size), value, dtype=torch.uint8).numpy()).save(path)


def test_an_imagefolder_of_several_classes_numbers_them_in_sorted_name_order(tmp_path):
    # catches: classes numbered in directory-listing (creation) order, or by a parsed number
    # (torchvision sorts the names: "10_ten" before "9_nine")
    for name, values in (("9_nine", (90, 91)), ("10_ten", (100,)), ("a_first", (7, 8, 9))):
        (tmp_path / name).mkdir()
        for i, value in reversed(list(enumerate(values))):     # written last to first
            _png(tmp_path / name / f"{i:02d}.png", value)
    (tmp_path / "export.json").write_text("{}")                # a file at the top: no class
    images, labels = read_imagefolder(tmp_path, channels=1)
    assert labels.tolist() == [0, 1, 1, 2, 2, 2]               # 10_ten, 9_nine, a_first
    assert (images[:, 0, 0, 0] * 255).round().tolist() == [100, 90, 91, 7, 8, 9]
    assert images.shape == (6, 1, 4, 4)
    rgb, _ = read_imagefolder(tmp_path, channels=3)
    assert rgb.shape == (6, 3, 4, 4) and torch.equal(rgb[:, 0], rgb[:, 2])


def test_an_imagefolder_without_images_in_class_folders_is_refused(tmp_path):
    # catches: an empty torch.stack traceback
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="holds no images in class folders"):
        read_imagefolder(tmp_path, channels=1)


def test_metrics_records_keep_every_whole_record_in_order(tmp_path):
    # catches: reading only the last record, or stopping at the first torn line
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"iteration": 0, "loss": 3.0}), "[1, 2]", "",
             json.dumps({"iteration": 1, "loss": 2.0}), '{"iteration": 2, "lo',
             json.dumps({"iteration": 3, "loss": 1.0}), '"text"', '{"iteration": 4, "loss": 0.5']
    path.write_text("\n".join(lines))
    assert [r["iteration"] for r in read_metrics(path)] == [0, 1, 3]
    assert read_metrics(tmp_path / "missing.jsonl") == []
