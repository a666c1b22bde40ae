"""Expert recipes (baselines/harness/expert_cache.py): PTLM's and DANCE's, their settings, the
cache key, the recorded recipe and the refusal to reuse a pool trained with another recipe."""
import json

import pytest
import torch

from baselines.harness import expert_cache
from baselines.harness.datasets import Dataset
from dm_plugins import ExpertPool
from dm_plugins.experts import training as experts_module
from dm_plugins.errors import ExpertError
from tests.conftest import make_toy


@pytest.fixture()
def toy_dataset():
    toy = make_toy(per_class=8)
    return Dataset("toyset", toy, toy, (0.0,), (1.0,), ["a", "b", "c"])


def test_dance_recipe_settings(toy_dataset):
    args = expert_cache.recipe_arguments("dance", 60, toy_dataset)
    assert (args["batch_size"], tuple(args["lr_milestones"]), args["lr_gamma"],
            args["cutmix_p"]) == (64, (40, 50), 0.2, 0.5)       # DANCE: epochs 40 and 50 of 60
    assert expert_cache.recipe_arguments("dance", 15, toy_dataset)["lr_milestones"] == (10, 12)
    ptlm = expert_cache.recipe_arguments("ptlm", 60, toy_dataset)
    assert ptlm["batch_size"] == 256 and "lr_milestones" not in ptlm and ptlm["augment_name"] == "dsa"
    with pytest.raises(ValueError, match="unknown expert recipe 'foo'"):
        expert_cache.recipe_arguments("foo", 60, toy_dataset)


def test_dance_augmentation_draws_per_image(toy_dataset):
    augment = expert_cache.recipe_arguments("dance", 60, toy_dataset)["augment"]
    x = torch.rand(1, 3, 8, 8).repeat(6, 1, 1, 1)
    out = augment(x, torch.Generator().manual_seed(0))
    assert len({tuple(o.flatten()[:8].tolist()) for o in out}) > 1   # not one draw for all


def test_cache_key_names_the_recipe():
    # ptlm's directories predate recipe names; the default (dance) is suffixed like any other
    assert expert_cache.cache_key("cifar10", "convnet", 60, 0, "ptlm") == "cifar10-convnet-e60-s0"
    assert expert_cache.cache_key("cifar10", "convnet", 60, 0, "dance") == \
        "cifar10-convnet-e60-s0-dance"
    assert expert_cache.cache_key("cifar10", "convnet", 60, 0) == "cifar10-convnet-e60-s0-dance"


def test_every_cli_defaults_to_the_measured_recipe():
    from baselines.harness.driver import build_parser
    from baselines import dance, dm, idm
    assert expert_cache.DEFAULT_RECIPE == "dance"
    for module in (dm, idm, dance):
        assert build_parser(module.SPEC).parse_args([]).expert_recipe == "dance"


def test_the_recipe_reaches_the_training_loop(toy_dataset, tmp_path, monkeypatch, tiny_factory):
    seen = []
    real_train = experts_module.train_classifier

    def spy(network, images, targets, **kwargs):
        seen.append(kwargs)
        return real_train(network, images, targets, **kwargs)

    monkeypatch.setattr(experts_module, "train_classifier", spy)
    monkeypatch.setattr(expert_cache, "get_network", lambda *a, **k: tiny_factory())
    pool, path = expert_cache.load_or_train_experts(
        toy_dataset, "tiny", num_experts=1, epochs=6, seed=0, recipe="dance",
        directory=tmp_path / "d", progress=False, log=lambda m: None)
    kwargs = seen[0]
    assert (kwargs["batch_size"], list(kwargs["lr_milestones"]), kwargs["lr_gamma"],
            kwargs["cutmix_p"]) == (64, [4, 5], 0.2, 0.5)
    meta = json.loads((tmp_path / "d" / "manifest.json").read_text())["meta"]
    assert (meta["batch_size"], meta["lr_milestones"], meta["lr_gamma"], meta["cutmix_p"],
            meta["augment"]) == (64, [4, 5], 0.2, 0.5, "idc-color-crop")
    assert "test_accuracy" in pool.experts[0].meta
    # the same directory asked for with PTLM's recipe: refused, naming a differing setting
    with pytest.raises(ExpertError, match="were trained with"):
        expert_cache.load_or_train_experts(
            toy_dataset, "tiny", num_experts=1, epochs=6, seed=0, recipe="ptlm",
            directory=tmp_path / "d", progress=False, log=lambda m: None)


def test_a_pool_saved_before_schedules_were_recorded_still_loads(toy, tiny_factory, tmp_path):
    kwargs = dict(num_experts=1, epochs=1, seed=0, batch_size=16, progress=False)
    ExpertPool.load_or_train(tmp_path, tiny_factory, toy.images, toy.labels, **kwargs)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert "lr_milestones" not in manifest["meta"] and "cutmix_p" not in manifest["meta"]
    again = ExpertPool.load_or_train(tmp_path, tiny_factory, toy.images, toy.labels, **kwargs)
    assert len(again) == 1
    with pytest.raises(ExpertError, match="cutmix_p"):
        ExpertPool.load_or_train(tmp_path, tiny_factory, toy.images, toy.labels, cutmix_p=0.5,
                                 **kwargs)
