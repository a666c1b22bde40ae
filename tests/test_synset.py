"""The synthetic-set file format, its validation, the preview grid and the atomic writers."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from baselines.harness.synset import (REQUIRED_META, SynSetError, atomic_torch_save,
                                      atomic_write_json, code_version, load_synset, save_grid,
                                      save_synset)


def make_set(n_classes=3, ipc=2, channels=3, size=8):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n_classes * ipc, channels, size, size, generator=g)
    labels = torch.arange(n_classes).repeat_interleave(ipc)
    meta = {"dataset": "cifar10", "mean": (0.4914, 0.4822, 0.4465), "std": [0.2023, 0.1994, 0.2010],
            "ipc": ipc, "factor": 1, "method": "dm", "plugins": ["cap", "ptm"],
            "config": {"lr_img": 1.0, "iterations": np.int64(20), "nested": {"a": (1, 2)}},
            "seed": 0}
    return images, labels, meta


def raw(images, labels, meta, **overrides):
    obj = {"format": "dm_plugins.synset", "version": 1, "images": images, "labels": labels,
           "meta": meta}
    obj.update(overrides)
    return obj


def error_of(path):
    with pytest.raises(SynSetError) as err:
        load_synset(path)
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


def test_round_trip(tmp_path):
    images, labels, meta = make_set()
    path = tmp_path / "out" / "synset.pt"  # parent folder is created
    save_synset(path, images, labels, meta)
    assert os.listdir(tmp_path / "out") == ["synset.pt"]  # no temp file left behind
    s = load_synset(path)
    assert torch.equal(s.images, images) and s.images.dtype == torch.float32
    assert torch.equal(s.labels, labels) and s.labels.dtype == torch.long
    assert s.meta["mean"] == [0.4914, 0.4822, 0.4465]  # tuples stored as lists
    assert s.meta["config"] == {"lr_img": 1.0, "iterations": 20, "nested": {"a": [1, 2]}}
    assert type(s.meta["config"]["iterations"]) is int
    for key in ("dataset", "ipc", "factor", "method", "plugins", "seed"):
        assert s.meta[key] == meta[key]
    assert s.meta["code_version"] == code_version() and s.meta["num_classes"] == 3
    assert s.num_classes == 3
    # plain types only: loads with weights_only
    obj = torch.load(path, weights_only=True)
    assert obj["format"] == "dm_plugins.synset" and obj["version"] == 1


def test_save_keeps_given_code_version_and_num_classes(tmp_path):
    images, labels, meta = make_set()
    meta.update(code_version="custom", num_classes=10)
    save_synset(tmp_path / "s.pt", images, labels, meta)
    s = load_synset(tmp_path / "s.pt")
    assert s.meta["code_version"] == "custom" and s.num_classes == 10


def test_save_rejects_bad_input(tmp_path):
    images, labels, meta = make_set()
    del meta["seed"]
    with pytest.raises(ValueError, match="seed"):
        save_synset(tmp_path / "s.pt", images, labels, meta)
    images, labels, meta = make_set()
    with pytest.raises(ValueError, match="pixel space"):
        save_synset(tmp_path / "s.pt", images * 4 - 2, labels, meta)
    with pytest.raises(ValueError, match="labels"):
        save_synset(tmp_path / "s.pt", images, labels[:-1], meta)
    with pytest.raises(ValueError, match="set"):
        save_synset(tmp_path / "s.pt", images, labels, {**meta, "plugins": {"cap"}})
    assert not os.listdir(tmp_path)


def test_overwrite_is_atomic_replace(tmp_path):
    images, labels, meta = make_set()
    save_synset(tmp_path / "s.pt", images, labels, meta)
    save_synset(tmp_path / "s.pt", images.flip(0), labels.flip(0), meta)
    assert os.listdir(tmp_path) == ["s.pt"]
    assert torch.equal(load_synset(tmp_path / "s.pt").labels, labels.flip(0))


def test_truncated_file(tmp_path):
    images, labels, meta = make_set()
    path = tmp_path / "s.pt"
    save_synset(path, images, labels, meta)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "is not a readable synthetic-set file (truncated or corrupt?)" in error_of(path)
    path.write_bytes(b"")
    assert "not a readable" in error_of(path)


def test_missing_file(tmp_path):
    message = error_of(tmp_path / "absent.pt")
    assert "no such" in message and "writes it as synthetic.pt" in message


def test_validation_errors(tmp_path):
    images, labels, meta = make_set()
    meta = {**meta, "mean": list(meta["mean"]), "config": {}, "code_version": "x", "num_classes": 3}
    path = tmp_path / "s.pt"

    def check(obj, fragment):
        torch.save(obj, path)
        assert fragment in error_of(path)

    check({"images": images}, "not a dm_plugins synthetic-set file")
    check(raw(images, labels, meta, version=2), "newer")
    check(raw(images, labels, {k: v for k, v in meta.items() if k != "ipc"}), "ipc")
    obj = raw(images, labels, meta)
    del obj["labels"]
    check(obj, "'labels'")
    check(raw(images, labels[:-1], meta), "shape mismatch")
    check(raw(images[0], labels, meta), "(N, C, H, W)")
    check(raw(images, labels.float(), meta), "integer")
    bad = labels.clone()
    bad[0] = 3
    check(raw(images, bad, meta), "labels must be in [0, 3)")
    bad[0] = -1
    check(raw(images, bad, meta), "labels must be in")
    check(raw(images * 2, labels, meta), "pixel space")
    check(raw(images, labels, {**meta, "std": [0.2]}), "channels")
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))
    # a tiny excursion outside [0, 1] (float rounding) is accepted
    torch.save(raw(images.clamp(0, 1) + 1e-6, labels, meta), path)
    load_synset(path)


def test_grid_one_row_per_class(tmp_path):
    images, labels, _ = make_set(n_classes=3, ipc=4, size=8)
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[-2:] = False  # class 2 has only 2 images: its row is padded
    path = tmp_path / "grid.png"
    save_grid(path, images[keep], labels[keep], max_per_class=3)
    assert os.listdir(tmp_path) == ["grid.png"]
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == (3 * (8 + 2) + 2, 3 * (8 + 2) + 2)  # (width: 3 cols, height: 3 rows)
    gray, glabels, _ = make_set(n_classes=2, ipc=1, channels=1, size=4)
    save_grid(path, gray, glabels)
    with Image.open(path) as img:
        assert img.size == (1 * 6 + 2, 2 * 6 + 2)


def test_atomic_write_json(tmp_path):
    path = tmp_path / "sub" / "results.json"
    atomic_write_json(path, {"acc": [0.5, 0.6], "name": "dm"})
    text = path.read_text()
    assert json.loads(text) == {"acc": [0.5, 0.6], "name": "dm"}
    assert '\n  "acc"' in text  # indent 2
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert json.loads(path.read_text())["name"] == "dm"  # old content intact
    assert os.listdir(path.parent) == ["results.json"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_atomic_torch_save(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save(path, {"w": torch.arange(3), "step": 7})
    atomic_torch_save(path, {"w": torch.arange(4), "step": 8})
    obj = torch.load(path, weights_only=True)
    assert obj["step"] == 8 and torch.equal(obj["w"], torch.arange(4))
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_code_version_never_fails():
    v = code_version()
    assert isinstance(v, str) and v
