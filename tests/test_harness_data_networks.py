"""Harness datasets (tiny fake folders, embedded digits) and networks (sizes, parameter counts)."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from baselines.harness.datasets import (IMAGENET_SUBSETS, DatasetError, available_datasets,
                                        load_dataset)
from baselines.harness.networks import ConvNet, available_networks, get_network


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def one_line(err):
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


def write_image(path, value, size=(8, 8), mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    color = value if mode == "L" else (value, value, value)
    Image.new(mode, size, color).save(path)


def mean_pixel_per_image(ds, split):
    pixels = ds.denormalize(split.images)
    return pixels.mean(dim=(1, 2, 3)) * 255


# ------------------------------------------------------------------------------------ networks

@pytest.mark.parametrize("name,expected", [("convnet", 320_010), ("resnet10", 1_228_970),
                                           ("resnet18", 11_173_962), ("densenet121", 1_000_618)])
def test_parameter_counts_cifar10(name, expected):
    assert n_params(get_network(name, 3, 10, 32)) == expected


def test_densenet121_is_about_one_million():
    assert 900_000 <= n_params(get_network("densenet121", 3, 10, 32)) <= 1_100_000


@pytest.mark.parametrize("channels,size,depth", [(1, 28, 3), (3, 32, 3), (3, 64, 4), (3, 128, 5)])
def test_convnet_embed_sizes(channels, size, depth):
    net = get_network("convnet", channels, 10, size)
    assert net.depth == depth
    x = torch.randn(2, channels, size, size)
    assert net.embed(x).shape == (2, 2048) == (2, net.feature_dim)
    assert net(x).shape == (2, 10)


def test_convnet_first_conv_padding_only_for_28px_gray():
    assert get_network("convnet", 1, 10, 28).features[0].padding == (3, 3)
    assert get_network("convnet", 1, 10, 32).features[0].padding == (1, 1)
    assert get_network("convnet", 3, 10, 32).features[0].padding == (1, 1)


def test_convnet_explicit_depth_and_variants():
    net = get_network("ConvNetD4", 3, 10, 32)
    assert net.depth == 4 and net.feature_dim == 128 * 2 * 2
    x = torch.randn(1, 3, 32, 32)
    for norm in ("batchnorm", "none", "instancenorm"):
        for act in ("relu", "leakyrelu", "sigmoid"):
            m = ConvNet(3, 5, width=8, norm=norm, act=act, pooling="maxpooling").eval()
            assert m(x).shape == (1, 5)
    flat = ConvNet(3, 5, width=4, depth=2, pooling="none")
    assert flat.embed(x).shape == (1, flat.feature_dim) == (1, 4 * 32 * 32)
    assert isinstance(get_network("convnet", 3, 10, 32).features[1], torch.nn.GroupNorm)


@pytest.mark.parametrize("name", ["resnet10", "densenet121"])
def test_cnn_embed_any_resolution_batch_one(name):
    net = get_network(name, 3, 10, 32).eval()
    with torch.no_grad():
        for size in (32, 64, 128):
            x = torch.randn(1, 3, size, size)
            assert net.embed(x).shape == (1, net.feature_dim)
            assert net(x).shape == (1, 10)


def test_resnet18_embed_and_gray_input():
    net = get_network("resnet-18", 3, 10, 32).eval()
    assert net.embed(torch.randn(2, 3, 32, 32)).shape == (2, 512) == (2, net.feature_dim)
    gray = get_network("resnet10", 1, 10, 28).eval()
    assert gray(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_unknown_network_lists_names():
    with pytest.raises(ValueError) as err:
        get_network("vgg11", 3, 10, 32)
    for name in available_networks():
        assert name in str(err.value)


# ------------------------------------------------------------------------------------- digits

@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits_shapes_and_stats(digits):
    assert digits.name == "digits" and digits.is_digit_like
    assert (digits.num_classes, digits.channels, digits.image_size) == (10, 1, 32)
    n_train, n_test = len(digits.train), len(digits.test)
    assert n_train + n_test == 1797
    assert abs(n_test / 1797 - 0.2) < 0.01
    for c in range(10):  # stratified
        frac = digits.test.class_size(c) / (digits.test.class_size(c) + digits.train.class_size(c))
        assert abs(frac - 0.2) < 0.02
    assert digits.train.images.dtype == torch.float32 and digits.train.labels.dtype == torch.long
    # mean/std come from the train split: normalised train pixels are standardised
    assert abs(float(digits.train.images.mean())) < 1e-4
    assert abs(float(digits.train.images.std()) - 1) < 1e-3
    pixels = digits.denormalize(digits.train.images)
    assert float(pixels.min()) > -1e-5 and float(pixels.max()) < 1 + 1e-5
    assert torch.allclose(digits.normalize(pixels), digits.train.images, atol=1e-5)


def test_digits_split_is_deterministic(digits):
    again = load_dataset("DIGITS")
    assert torch.equal(again.train.images, digits.train.images)
    assert torch.equal(again.test.labels, digits.test.labels)
    assert again.mean == digits.mean


# -------------------------------------------------------------------------------- imagefolder

def make_imagefolder(root, train_counts=(3, 2), test_counts=(2, 1), mode="RGB"):
    for split, counts in (("train", train_counts), ("test", test_counts)):
        for label, (cls, n) in enumerate(zip(("cat", "dog"), counts)):
            for i in range(n):
                write_image(os.path.join(root, split, cls, f"{i}.png"), 40 + 100 * label, mode=mode)


def test_imagefolder_loads(tmp_path):
    make_imagefolder(tmp_path)
    write_image(tmp_path / "train" / "dog" / "big.png", 140, size=(16, 12))  # resized to 8x8
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    ds = load_dataset(f"imagefolder:{tmp_path}")
    assert ds.name == f"imagefolder:{tmp_path}"
    assert ds.class_names == ["cat", "dog"] and not ds.is_digit_like
    assert ds.train.images.shape == (6, 3, 8, 8) and ds.test.images.shape == (3, 3, 8, 8)
    assert ds.train.class_sizes() == [3, 3] and ds.test.labels.tolist() == [0, 0, 1]
    assert torch.allclose(mean_pixel_per_image(ds, ds.train),
                          torch.tensor([40., 40, 40, 140, 140, 140]), atol=0.5)
    mean = torch.tensor(ds.mean)
    assert torch.allclose(mean * 255, torch.full((3,), 90.0), atol=0.5)


def test_imagefolder_grayscale_and_mixed(tmp_path):
    make_imagefolder(tmp_path / "gray", mode="L")
    assert load_dataset(f"imagefolder:{tmp_path / 'gray'}").channels == 1
    make_imagefolder(tmp_path / "mixed", mode="L")
    write_image(tmp_path / "mixed" / "test" / "dog" / "rgb.png", 140)
    ds = load_dataset(f"imagefolder:{tmp_path / 'mixed'}")
    assert ds.channels == 3 and len(ds.mean) == 3


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_dataset(f"imagefolder:{tmp_path / 'nope'}")
    assert "train" in one_line(err) and "test" in str(err.value)
    make_imagefolder(tmp_path)
    write_image(tmp_path / "test" / "bird" / "0.png", 10)
    with pytest.raises(DatasetError) as err:
        load_dataset(f"imagefolder:{tmp_path}")
    assert "bird" in one_line(err)


# ------------------------------------------------------------------------------ tinyimagenet

def test_tinyimagenet_layout_and_val_annotations(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n03", "n01", "n02"]  # file order differs from the sorted label order
    root.mkdir()
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("n01\tgoldfish, Carassius\nn02\tsalamander\nn03\tbullfrog\n")
    value = {"n01": 20, "n02": 120, "n03": 220}
    for w in wnids:
        for i in range(2):
            write_image(str(root / "train" / w / "images" / f"{w}_{i}.JPEG"), value[w],
                        size=(64, 64))
    val_order = ["n02", "n03", "n01", "n02"]
    lines = []
    for i, w in enumerate(val_order):
        write_image(str(root / "val" / "images" / f"val_{i}.JPEG"), value[w], size=(64, 64))
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")

    for data_path in (tmp_path, root):  # the parent folder or the dataset folder itself
        ds = load_dataset("tinyimagenet", data_path=str(data_path))
        assert ds.class_names == ["goldfish", "salamander", "bullfrog"]
        assert ds.train.images.shape == (6, 3, 64, 64) and ds.image_size == 64
        assert ds.mean == (0.485, 0.456, 0.406)
        assert ds.test.labels.tolist() == [1, 2, 0, 1]
        expected = torch.tensor([value[w] for w in val_order], dtype=torch.float32)
        assert torch.allclose(mean_pixel_per_image(ds, ds.test), expected, atol=2)
        assert torch.allclose(mean_pixel_per_image(ds, ds.train),
                              torch.tensor([20., 20, 120, 120, 220, 220]), atol=2)


def test_tinyimagenet_missing(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_dataset("tinyimagenet", data_path=str(tmp_path))
    assert "tiny-imagenet-200" in one_line(err)


# --------------------------------------------------------------------------- imagenet subsets

def make_imagenet(root, all_folders=True):
    """Fake ImageNet root: ``n%08d`` wnids so that sorted position == class index."""
    wnids = [f"n{i:08d}" for i in range(1000)]
    needed = IMAGENET_SUBSETS["imagenette"]
    for split in ("train", "val"):
        for i in (range(1000) if all_folders else needed):
            os.makedirs(os.path.join(root, split, wnids[i]))
    for label, i in enumerate(needed):
        write_image(os.path.join(root, "train", wnids[i], "a.JPEG"), 10 + 20 * label, size=(48, 32))
        write_image(os.path.join(root, "val", wnids[i], "b.JPEG"), 10 + 20 * label, size=(32, 40))
    return wnids


def test_imagenet_subset_all_folders(tmp_path):
    make_imagenet(str(tmp_path))
    ds = load_dataset("ImageNette", data_path=str(tmp_path))
    assert ds.name == "imagenette" and ds.num_classes == 10
    assert ds.train.images.shape == (10, 3, 128, 128) and ds.test.images.shape == (10, 3, 128, 128)
    assert ds.class_names[0] == "tench"
    assert ds.train.labels.tolist() == list(range(10))
    expected = torch.tensor([10. + 20 * k for k in range(10)])
    assert torch.allclose(mean_pixel_per_image(ds, ds.train), expected, atol=2)
    assert torch.allclose(mean_pixel_per_image(ds, ds.test), expected, atol=2)


def test_imagenet_subset_partial_copy_needs_wnids_file(tmp_path):
    wnids = make_imagenet(str(tmp_path), all_folders=False)
    with pytest.raises(DatasetError) as err:
        load_dataset("imagenette", data_path=str(tmp_path))
    assert "wnids.txt" in one_line(err)
    (tmp_path / "wnids.txt").write_text("\n".join(wnids) + "\n")
    ds = load_dataset("imagenette", data_path=str(tmp_path))
    assert ds.train.class_sizes() == [1] * 10
    with pytest.raises(DatasetError) as err:  # other subsets' folders are absent
        load_dataset("imagewoof", data_path=str(tmp_path))
    one_line(err)


# ------------------------------------------------------------------------------------ errors

def test_unknown_dataset_lists_names():
    with pytest.raises(DatasetError) as err:
        load_dataset("svhn")
    msg = one_line(err)
    for name in ("digits", "cifar10", "imagenette", "imagefolder:PATH"):
        assert name in msg
    assert set(available_datasets()) >= {"mnist", "fashion-mnist", "cifar100", "tinyimagenet"}


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10", "cifar100"])
def test_torchvision_absent_offline(tmp_path, name):
    with pytest.raises(DatasetError) as err:
        load_dataset(name, data_path=str(tmp_path), download=False)
    assert str(tmp_path) in one_line(err)


def test_torchvision_loads_cifar_files(tmp_path, monkeypatch):
    """A fake cifar-10-batches-py folder goes through the fast .data/.targets conversion."""
    import pickle
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.RandomState(0)

    def batch(n):
        return {"data": rng.randint(0, 256, (n, 3072), dtype=np.uint8),
                "labels": [i % 10 for i in range(n)]}
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(4), f)
    test = batch(10)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(test, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)

    import torchvision.datasets.cifar as tv_cifar
    with pytest.raises(DatasetError) as err:  # fake files do not match torchvision's md5 sums
        load_dataset("cifar10", data_path=str(tmp_path), download=False)
    assert "corrupted" in one_line(err)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    ds = load_dataset("CIFAR-10", data_path=str(tmp_path), download=False)
    assert ds.train.images.shape == (20, 3, 32, 32) and ds.test.images.shape == (10, 3, 32, 32)
    assert ds.class_names[0] == "c0" and ds.mean == (0.4914, 0.4822, 0.4465)
    first = torch.from_numpy(test["data"][0].reshape(3, 32, 32).astype(np.float32) / 255)
    assert torch.allclose(ds.denormalize(ds.test.images[0]), first, atol=1e-5)
    assert ds.test.labels.tolist() == list(range(10))
