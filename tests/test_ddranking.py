"""Sets for DD-Ranking (docs/ddranking.md): ``export.py --to tensor --stats ddranking`` writes what
DD-Ranking 0.2.0 reads as its synthetic tensor input, normalised as it normalises that dataset's
test images, and refuses datasets it does not have; ImageFolder exports name class folders
``<index>_<name>``. Checked against a stand-in of DD-Ranking's input contract, and against
DD-Ranking itself when ``ddranking`` is importable (skipped otherwise)."""
import inspect
import json
import re

import pytest
import torch
from torchvision import transforms

from baselines import export
from baselines.harness.exchange import read_imagefolder
from baselines.harness.synset import save_synset
from tests.test_reliability import one_line_error

# DD-Ranking 0.2.0's get_dataset: CIFAR-10 and CIFAR-100 test images are normalised with
# CIFAR-10's statistics, TinyImageNet and the ImageNet subsets with ImageNet's
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_OURS = ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762))
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck"]


def a_set(path, dataset, *, classes=10, channels=3, size=32, ipc=2, stats=CIFAR100_OURS, **meta):
    """A saved synthetic set of ``dataset`` (random pixels), as a run writes it."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(classes * ipc, channels, size, size, generator=g)
    labels = torch.arange(classes).repeat_interleave(ipc)
    mean, std = ([stats[0][0]] * channels, [stats[1][0]] * channels) if channels != 3 else stats
    save_synset(path, pixels, labels, {
        "dataset": dataset, "mean": list(mean), "std": list(std), "ipc": ipc, "factor": 1,
        "method": "dm", "plugins": [], "config": {}, "seed": 0, "num_classes": classes, **meta})
    return pixels, labels


def check_ddranking_tensor_input(images, labels, num_classes):
    """The stand-in of DD-Ranking's synthetic tensor input (its ``TensorDataset`` takes the tensors
    as they are): float32 N x 3 x H x W, int64 labels 0..K-1, one per image."""
    assert images.dtype == torch.float32 and images.ndim == 4 and images.shape[1] == 3
    assert labels.dtype == torch.int64 and labels.shape == (images.shape[0],)
    assert int(labels.min()) == 0 and int(labels.max()) == num_classes - 1


def test_a_cifar100_tensor_is_normalised_as_ddranking_normalises_its_test_set(tmp_path):
    pixels, labels = a_set(tmp_path / "synthetic.pt", "cifar100", classes=100, ipc=1)
    out = tmp_path / "ddr"
    assert export.main([str(tmp_path), "--to", "tensor", "--stats", "ddranking",
                        "--out", str(out)]) == 0
    images, read_labels = torch.load(out / "images.pt"), torch.load(out / "labels.pt")
    check_ddranking_tensor_input(images, read_labels, 100)
    assert torch.equal(read_labels, labels)
    # a test image x of DD-Ranking's is Normalize(mean, std)(ToTensor(x)): the same map here
    normalize = transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)
    torch.testing.assert_close(images, torch.stack([normalize(x) for x in pixels]),
                               rtol=0, atol=1e-6)
    record = json.loads((out / "export.json").read_text())
    assert record["stats"] == "ddranking" and record["ddranking_dataset"] == "CIFAR100"
    assert record["mean"] == list(CIFAR10_MEAN) and record["std"] == list(CIFAR10_STD)
    assert record["run_mean"] == list(CIFAR100_OURS[0])
    # the run's own statistics (the default) would be off by up to ~0.6 per value
    assert export.main([str(tmp_path), "--to", "tensor", "--out", str(tmp_path / "own")]) == 0
    assert (torch.load(tmp_path / "own" / "images.pt") - images).abs().max() > 0.5


@pytest.mark.parametrize("dataset,name", [("cifar10", "CIFAR10"), ("tinyimagenet", "TinyImageNet"),
                                          ("imagenette", "ImageNette")])
def test_each_ddranking_dataset_gets_its_own_statistics(tmp_path, dataset, name):
    classes = 200 if dataset == "tinyimagenet" else 10
    pixels, _ = a_set(tmp_path / "synthetic.pt", dataset, classes=classes, ipc=1, size=8)
    assert export.main([str(tmp_path), "--to", "tensor", "--stats", "ddranking"]) == 0
    record = json.loads((tmp_path / "export-tensor" / "export.json").read_text())
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if dataset == "cifar10" else imagenet
    assert record["ddranking_dataset"] == name and (record["mean"], record["std"]) == (
        list(mean), list(std))
    images = torch.load(tmp_path / "export-tensor" / "images.pt")
    torch.testing.assert_close(images, transforms.Normalize(mean, std)(pixels), rtol=0, atol=1e-6)


def test_datasets_ddranking_does_not_have_are_refused_in_one_line(tmp_path, capsys):
    a_set(tmp_path / "folder" / "synthetic.pt", "imagefolder:/data/cifar10-mini",
          class_names=CIFAR10_NAMES)
    a_set(tmp_path / "digits" / "synthetic.pt", "digits", channels=1)
    for run, spec, needle in [
            ("folder", "ddranking", "DD-Ranking has no dataset 'imagefolder:/data/cifar10-mini'"),
            ("digits", "ddranking", "DD-Ranking has no dataset 'digits'"),
            ("digits", "ddranking:CIFAR10", "1-channel"),
            ("folder", "ddranking:CIFAR100", "100 classes"),
            ("folder", "ddranking:MNIST", "no dataset 'MNIST'"),
            ("folder", "ddranking:", "use run, ddranking or ddranking:NAME"),
            ("folder", "imagenet", "use run, ddranking or ddranking:NAME")]:
        out = tmp_path / f"out-{run}"
        one_line_error(capsys, export.main, [str(tmp_path / run), "--to", "tensor",
                                             "--stats", spec, "--out", str(out)], needle)
        assert not out.exists() or not any(out.iterdir())    # nothing written


def test_a_subset_kept_as_an_image_folder_names_its_ddranking_dataset(tmp_path):
    pixels, _ = a_set(tmp_path / "synthetic.pt", "imagefolder:/data/cifar10-mini")
    assert export.main([str(tmp_path), "--to", "tensor", "--stats", "ddranking:cifar10"]) == 0
    images = torch.load(tmp_path / "export-tensor" / "images.pt")
    torch.testing.assert_close(images, transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)(pixels),
                               rtol=0, atol=1e-6)


def test_imagefolder_classes_are_index_and_name_and_old_exports_still_read(tmp_path):
    pixels, labels = a_set(tmp_path / "named" / "synthetic.pt", "cifar10",
                           class_names=CIFAR10_NAMES)
    assert export.main([str(tmp_path / "named"), "--to", "imagefolder"]) == 0
    folder = tmp_path / "named" / "export-imagefolder"
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == [
        f"{c:03d}_{n}" for c, n in enumerate(CIFAR10_NAMES)]
    images, read_labels = read_imagefolder(folder, channels=3)
    assert torch.equal(read_labels, labels) and (images - pixels).abs().max() <= 0.5 / 255 + 1e-6
    # an image-folder run without names in its meta takes them from the dataset's train/ folders
    root = tmp_path / "mini"
    for name in CIFAR10_NAMES:
        (root / "train" / name).mkdir(parents=True)
    a_set(tmp_path / "folder" / "synthetic.pt", f"imagefolder:{root}")
    assert export.main([str(tmp_path / "folder"), "--to", "imagefolder"]) == 0
    assert (tmp_path / "folder" / "export-imagefolder" / "009_truck").is_dir()
    # an older export's 000_0 folders read back in the same class order
    old = tmp_path / "old"
    for c, sub in enumerate(sorted(p for p in folder.iterdir() if p.is_dir())):
        (old / f"{c:03d}_{c}").mkdir(parents=True)
        for png in sub.iterdir():
            (old / f"{c:03d}_{c}" / png.name).write_bytes(png.read_bytes())
    old_images, old_labels = read_imagefolder(old, channels=3)
    assert torch.equal(old_images, images) and torch.equal(old_labels, read_labels)


def test_ddranking_itself_reads_the_export(tmp_path):
    ddranking_utils = pytest.importorskip("ddranking.utils")
    a_set(tmp_path / "synthetic.pt", "cifar10", stats=(CIFAR10_MEAN, CIFAR10_STD))
    assert export.main([str(tmp_path), "--to", "tensor", "--stats", "ddranking"]) == 0
    images = torch.load(tmp_path / "export-tensor" / "images.pt")
    labels = torch.load(tmp_path / "export-tensor" / "labels.pt")
    batch, batch_labels = next(iter(torch.utils.data.DataLoader(
        ddranking_utils.TensorDataset(images, labels), batch_size=len(labels))))
    assert torch.equal(batch, images) and torch.equal(batch_labels, labels)   # taken as it is
    source = inspect.getsource(ddranking_utils.get_dataset)
    cifar10 = source[source.index("'CIFAR10'"):source.index("'CIFAR100'")]
    numbers = [float(v) for v in re.findall(r"\d+\.\d+", cifar10)]
    assert all(v in numbers for v in CIFAR10_MEAN + CIFAR10_STD), numbers
