"""The expert recipe as one value (dm_plugins/experts/recipe.py): its manifest dict (as earlier
versions wrote it), its hash (stable, equal for equal recipes, different for any recorded
setting), the round trip through a manifest, and manifests with and without the hash."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from baselines.harness import expert_cache
from baselines.harness.datasets import Dataset
from dm_plugins import ExpertError, ExpertPool
from dm_plugins.experts import ExpertRecipe, train_expert
from tests.conftest import TinyNet, make_toy

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(epochs=1, batch_size=12, progress=False)
DANCE_LIKE = dict(epochs=6, batch_size=64, lr_milestones=(4, 5), lr_gamma=0.2, cutmix_p=0.5,
                  augment_name="idc-color-crop")


def tiny():
    return TinyNet(channels=1, num_classes=3, width=4, size=8)


def scale_augment(x, generator):
    return x * (0.9 + 0.2 * torch.rand((), generator=generator))


def other_augment(x, generator):
    return x


# -- the manifest dict ---------------------------------------------------------------------------
def test_the_manifest_dict_is_the_one_written_before():
    # written out by hand: key for key (and in order) what manifests have always recorded
    assert list(ExpertRecipe().manifest().items()) == [
        ("epochs", 70), ("seed", 0), ("lr", 0.01), ("momentum", 0.9), ("weight_decay", 5e-4),
        ("batch_size", 256), ("augment", "none")]
    assert list(ExpertRecipe(**DANCE_LIKE).manifest().items()) == [
        ("epochs", 6), ("seed", 0), ("lr", 0.01), ("momentum", 0.9), ("weight_decay", 5e-4),
        ("batch_size", 64), ("augment", "idc-color-crop"), ("lr_milestones", [4, 5]),
        ("lr_gamma", 0.2), ("cutmix_p", 0.5)]
    assert ExpertRecipe(cutmix_p=0.25).manifest()["cutmix_p"] == 0.25
    assert "lr_gamma" not in ExpertRecipe(lr_gamma=0.5).manifest()   # no schedule: left out
    assert ExpertRecipe(augment=scale_augment).manifest()["augment"] == "scale_augment"


def test_the_manifest_dict_round_trips():
    for recipe in (ExpertRecipe(), ExpertRecipe(**DANCE_LIKE), ExpertRecipe(cutmix_p=0.3),
                   ExpertRecipe(epochs=3, seed=9, lr=0.05, momentum=0.5, weight_decay=0.0,
                                augment_name="dsa")):
        back = ExpertRecipe.from_manifest(json.loads(json.dumps(recipe.manifest())))
        assert back == recipe and back.manifest() == recipe.manifest()
        assert back.digest() == recipe.digest()
    # the augmentation comes back by name only
    named = ExpertRecipe(augment=scale_augment)
    back = ExpertRecipe.from_manifest(named.manifest())
    assert back.augment is None and back.augment_name == "scale_augment"
    assert back.digest() == named.digest()
    # a pool's meta holds more than the recipe: the rest is ignored
    assert ExpertRecipe.from_manifest({**named.manifest(), "dataset": "toy"}) == back
    with pytest.raises(ValueError, match="records no 'epochs'"):
        ExpertRecipe.from_manifest({"dataset": "toy"})


def test_an_old_manifest_dict_without_schedule_keys_reads_as_the_constant_lr_recipe():
    old = {"epochs": 15, "seed": 0, "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0005,
           "batch_size": 256, "augment": "dsa", "dataset": "cifar10"}
    recipe = ExpertRecipe.from_manifest(old)
    assert recipe == ExpertRecipe(epochs=15, augment_name="dsa")
    assert recipe.lr_milestones == () and recipe.lr_gamma == 0.1 and recipe.cutmix_p == 0.0


# -- the hash ------------------------------------------------------------------------------------
def test_the_hash_is_pinned_and_the_same_in_another_process():
    # pinned: the same in every run, process and Python version (SHA-256 of canonical JSON)
    assert ExpertRecipe().digest() == "804e6d9ebdff"
    dance = ExpertRecipe(**DANCE_LIKE)
    code = ("from dm_plugins.experts import ExpertRecipe; "
            "print(ExpertRecipe().digest(), ExpertRecipe(epochs=6, batch_size=64, "
            "lr_milestones=[4, 5], lr_gamma=0.2, cutmix_p=0.5, "
            "augment_name='idc-color-crop').digest())")
    for hash_seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                             text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": hash_seed}).stdout.split()
        assert out == [ExpertRecipe().digest(), dance.digest()]
    assert len(dance.digest()) == 12 and int(dance.digest(), 16) >= 0


def test_equal_recipes_have_equal_hashes():
    pairs = [
        (ExpertRecipe(lr_milestones=[4, 5]), ExpertRecipe(lr_milestones=(4, 5))),
        (ExpertRecipe(lr=1, momentum=0), ExpertRecipe(lr=1.0, momentum=0.0)),
        (ExpertRecipe(augment=scale_augment), ExpertRecipe(augment_name="scale_augment")),
        (ExpertRecipe(augment_name="none"), ExpertRecipe()),
    ]
    for a, b in pairs:
        assert a.digest() == b.digest(), (a, b)
    assert pairs[0][0] == pairs[0][1] and hash(pairs[0][0]) == hash(pairs[0][1])
    # settings without effect do not count: lr_gamma without milestones, as on reuse
    assert ExpertRecipe(lr_gamma=0.5).digest() == ExpertRecipe().digest()


def test_any_recorded_setting_changes_the_hash():
    base = dict(DANCE_LIKE)
    changes = {"epochs": 7, "seed": 1, "lr": 0.02, "momentum": 0.8, "weight_decay": 1e-3,
               "batch_size": 32, "lr_milestones": (3, 5), "lr_gamma": 0.1, "cutmix_p": 0.4,
               "augment_name": "dsa"}
    assert set(changes) | {"augment"} == {f.name for f in dataclasses.fields(ExpertRecipe)}
    digests = {ExpertRecipe(**base).digest()}
    for key, value in changes.items():
        digests.add(ExpertRecipe(**{**base, key: value}).digest())
    assert len(digests) == 1 + len(changes)
    # the augmentation counts by its name
    assert ExpertRecipe(augment=scale_augment).digest() != \
        ExpertRecipe(augment=other_augment).digest()
    assert ExpertRecipe(cutmix_p=0.5).digest() != ExpertRecipe().digest()


def test_the_recipe_is_frozen_and_settings_go_one_way():
    recipe = ExpertRecipe()
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.lr = 0.1
    toy = make_toy(per_class=4)
    with pytest.raises(TypeError, match=r"not both \(batch_size, lr given with a recipe\)"):
        ExpertPool.train(tiny, toy.images, toy.labels, num_experts=1, lr=0.1, batch_size=12,
                         recipe=recipe)
    with pytest.raises(TypeError, match="needs epochs"):
        train_expert(tiny, toy.images, toy.labels, index=0)


# -- the recipe through the pool -----------------------------------------------------------------
def test_a_recipe_trains_the_same_experts_as_its_keywords(toy, tmp_path):
    kw = dict(epochs=1, seed=3, lr=0.05, batch_size=12, lr_milestones=(1,), lr_gamma=0.5,
              augment=scale_augment)
    loose = ExpertPool.train(tiny, toy.images, toy.labels, num_experts=2, progress=False, **kw)
    one = ExpertPool.train(tiny, toy.images, toy.labels, num_experts=2, progress=False,
                           recipe=ExpertRecipe(**kw))
    assert loose.meta == one.meta and loose.seed == one.seed == 3
    assert one.recipe == ExpertRecipe(**kw)
    for a, b in zip(loose.experts, one.experts):
        assert all(torch.equal(a.trained_state[n], b.trained_state[n]) for n in a.trained_state)
    single = train_expert(tiny, toy.images, toy.labels, index=1, recipe=ExpertRecipe(**kw),
                          progress=False)
    assert all(torch.equal(single.trained_state[n], one.experts[1].trained_state[n])
               for n in single.trained_state)


def test_the_manifest_records_the_hash_and_reuse_checks_it(toy, tmp_path):
    d, recipe = tmp_path / "e", ExpertRecipe(epochs=1, batch_size=12, augment_name="dsa")
    ExpertPool.load_or_train(d, tiny, toy.images, toy.labels, num_experts=1, recipe=recipe,
                             progress=False)
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["recipe_hash"] == recipe.digest()
    assert ExpertRecipe.from_manifest(manifest["meta"]).digest() == manifest["recipe_hash"]
    # the same recipe as keywords: reused
    lines = []
    ExpertPool.load_or_train(d, tiny, toy.images, toy.labels, num_experts=1, augment_name="dsa",
                             log=lines.append, **FAST)
    assert lines == [f"experts: loaded 1 from {d}"]
    # a recorded hash of another recipe: refused, never retrained
    manifest["recipe_hash"] = "0123456789ab"
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExpertError, match=r"were trained with recipe hash '0123456789ab' but "):
        ExpertPool.load_or_train(d, tiny, toy.images, toy.labels, num_experts=1, recipe=recipe,
                                 progress=False)


def test_an_old_manifest_without_the_hash_still_loads_and_gains_it_on_resume(toy, tmp_path):
    d, recipe = tmp_path / "e", ExpertRecipe(epochs=1, batch_size=12)
    first = ExpertPool.load_or_train(d, tiny, toy.images, toy.labels, num_experts=1,
                                     recipe=recipe, progress=False)
    manifest = json.loads((d / "manifest.json").read_text())
    del manifest["recipe_hash"]                          # as written before the hash existed
    (d / "manifest.json").write_text(json.dumps(manifest))
    assert len(ExpertPool.load(d, tiny)) == 1
    lines = []
    again = ExpertPool.load_or_train(d, tiny, toy.images, toy.labels, num_experts=1,
                                     recipe=recipe, progress=False, log=lines.append)
    assert lines == [f"experts: loaded 1 from {d}"]      # nothing retrained
    assert torch.equal(again.experts[0].trained_state["classifier.bias"],
                       first.experts[0].trained_state["classifier.bias"])
    # another recipe is still refused on the recorded settings
    with pytest.raises(ExpertError, match="were trained with lr=0.01 but lr=0.1"):
        ExpertPool.load_or_train(d, tiny, toy.images, toy.labels, num_experts=1,
                                 recipe=dataclasses.replace(recipe, lr=0.1), progress=False)
    # growing the pool rewrites the manifest, now with the hash
    ExpertPool.load_or_train(d, tiny, toy.images, toy.labels, num_experts=2, recipe=recipe,
                             progress=False)
    assert json.loads((d / "manifest.json").read_text())["recipe_hash"] == recipe.digest()


def test_the_named_recipes_become_expert_recipes(tmp_path, monkeypatch, tiny_factory):
    toy = make_toy(per_class=8)
    dataset = Dataset("toyset", toy, toy, (0.0,), (1.0,), ["a", "b", "c"])
    dance = expert_cache.expert_recipe("dance", 6, 2, dataset)
    assert (dance.epochs, dance.seed, dance.batch_size, dance.lr_milestones, dance.lr_gamma,
            dance.cutmix_p, dance.augment_name) == (6, 2, 64, (4, 5), 0.2, 0.5, "idc-color-crop")
    assert expert_cache.expert_recipe("ptlm", 6, 0, dataset).augment_name == "dsa"
    monkeypatch.setattr(expert_cache, "get_network", lambda *a, **k: tiny_factory())
    expert_cache.load_or_train_experts(dataset, "tiny", num_experts=1, epochs=6, seed=2,
                                       recipe="dance", directory=tmp_path / "d",
                                       progress=False, log=lambda m: None)
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["recipe_hash"] == dance.digest()
