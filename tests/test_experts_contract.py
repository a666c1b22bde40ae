"""The expert pool's contract: on-disk format, recipe metadata, seed and argument plumbing,
test-accuracy bookkeeping and the exact error messages.

Every expectation here is computed independently of ``dm_plugins.experts``: golden values
(with how they were obtained), files read back with ``json`` / ``torch.load``, a naive accuracy,
or the arguments a spy sees arriving at ``train_classifier``. Training is 1 epoch of a tiny
network on 36 toy images (tens of milliseconds).
"""
from __future__ import annotations

import functools
import inspect
import json
import math
import re

import pytest
import torch

import dm_plugins.experts.training as experts_mod   # where experts are trained
from dm_plugins import Expert, ExpertError, ExpertPool
from dm_plugins.experts import _accuracy_text, train_expert
from dm_plugins.seeding import derive_seed, make_generator
from dm_plugins.training import train_classifier as real_train_classifier
from tests.conftest import TinyNet

FORMAT = "dm_plugins.experts"        # the on-disk format tag, spelled out (not imported)
FAST = dict(epochs=1, batch_size=12, progress=False)


def tiny():
    return TinyNet(channels=1, num_classes=3, width=4, size=8)


def tiny5():
    return TinyNet(channels=1, num_classes=5, width=4, size=8)


def hand_expert(seed: int, meta: dict | None = None, factory=tiny) -> Expert:
    """An expert without training: two seeded constructions as theta_init and theta_star."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        init = factory().state_dict()
        star = factory().state_dict()
    return Expert(init, star, dict(meta or {}))


def naive_accuracy(state: dict, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy (%) of a TinyNet holding ``state``, written out by hand."""
    net = tiny()
    net.load_state_dict(state)
    with torch.no_grad():
        hits = (net(images).argmax(dim=1) == labels).sum().item()
    return 100.0 * hits / len(labels)


class Spy:
    """Records the keyword arguments (and the generator's starting state) each
    ``train_classifier`` call receives, then trains for real."""

    def __init__(self):
        self.calls, self.returned = [], []

    def __call__(self, network, images, targets, **kw):
        self.calls.append({**kw, "generator_state": kw["generator"].get_state().clone()})
        self.returned.append(real_train_classifier(network, images, targets, **kw))
        return self.returned[-1]


@pytest.fixture
def spy(monkeypatch):
    s = Spy()
    monkeypatch.setattr(experts_mod, "train_classifier", s)
    return s


def scale_augment(x, generator):
    """A test augmentation (a function, so its recorded name is its __qualname__)."""
    return x * (0.9 + 0.2 * torch.rand((), generator=generator))


class CallableAugment:
    """A callable object: instances have no __qualname__, so the recipe records the type name."""

    def __call__(self, x, generator):
        return x


class NotAWeight:
    """A custom class: a file pickling it must not be loaded (weights_only)."""

    def __init__(self):
        self.payload = 1


def write_manifest(directory, manifest: dict):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def write_expert_file(directory, k: int, expert: Expert):
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT, "init": expert.init_state, "trained": expert.trained_state,
                "meta": expert.meta}, directory / f"expert_{k}.pt")


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


# -- construction, pick, describe ------------------------------------------------------------
def test_build_network_names_what_the_factory_returned():
    with pytest.raises(ExpertError, match=r"^the network factory returned str, not an nn\.Module$"):
        ExpertPool([hand_expert(0)], lambda: "x")


def test_an_empty_pool_is_refused_and_the_pick_seed_defaults_to_0():
    with pytest.raises(ExpertError, match=r"^an expert pool needs at least one expert$"):
        ExpertPool([], tiny)
    assert ExpertPool([hand_expert(0)], tiny).seed == 0


# Golden pick streams, computed once as derive_seed(seed, 0xE7, t) % 5 (0xE7 is the pick
# stream). derive_seed is a splitmix64 chain in plain integer arithmetic, so these never change
# across Python/PyTorch versions; PTM and PLM (and resumed runs) rely on this exact sequence.
PICKS_SEED0 = [2, 0, 1, 0, 3, 4, 4, 4, 4, 0, 0, 1]
PICKS_SEED3 = [1, 0, 0, 4, 0, 1, 4, 3, 4, 2, 4, 0]


def test_pick_sequence_is_pinned():
    five = [hand_expert(k) for k in range(5)]
    assert [ExpertPool(five, tiny).pick(t) for t in range(12)] == PICKS_SEED0
    assert [ExpertPool(five, tiny, seed=3).pick(t) for t in range(12)] == PICKS_SEED3


def test_describe():
    experts = [hand_expert(0), hand_expert(1)]
    meta = {"epochs": 6, "lr": 0.05, "num_classes": 3, "arch": "tiny", "dataset": "toy"}
    assert ExpertPool(experts, tiny, meta=meta).describe() == \
        "dataset=toy, arch=tiny, num_classes=3, epochs=6"
    assert ExpertPool(experts, tiny, meta={"arch": "tiny"}).describe() == "arch=tiny"
    assert ExpertPool(experts, tiny).describe() == "2 experts"
    assert ExpertPool(experts, tiny, meta={"lr": 0.05}).describe() == "2 experts"


# -- memory format -----------------------------------------------------------------------------
def test_networks_in_channels_last_have_channels_last_weights():
    pool = ExpertPool([hand_expert(0)], tiny)
    cl = torch.channels_last
    # features.4 is the 4 -> 4 channel conv (a 1-channel conv is trivially both formats)
    net = pool.network(memory_format=cl)
    assert net.features[4].weight.is_contiguous(memory_format=cl)
    assert not pool.network().features[4].weight.is_contiguous(memory_format=cl)
    plain = pool.trained_network(0)
    last = pool.trained_network(0, memory_format=cl)
    assert last is not plain and pool.trained_network(0, memory_format=cl) is last
    assert last.features[4].weight.is_contiguous(memory_format=cl)
    assert not plain.features[4].weight.is_contiguous(memory_format=cl)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(last(x), plain(x))


# -- compatibility messages ----------------------------------------------------------------------
def test_check_compatible_quotes_the_first_two_differences():
    pool = ExpertPool([hand_expert(0)], tiny, meta={"arch": "tiny"})
    # sorted symmetric difference of {name: shape}: the two classifier.bias entries come first
    diff = "[('classifier.bias', (3,)), ('classifier.bias', (5,))]"
    expected = ("the experts (arch=tiny) do not fit this network: parameter names/shapes differ "
                f"(e.g. {diff}); use experts trained for this architecture and class count")
    with pytest.raises(ExpertError, match="^" + re.escape(expected) + "$"):
        pool.check_compatible(tiny5())


def test_an_expert_missing_a_trained_parameter_is_named():
    e = hand_expert(0)
    del e.trained_state["classifier.bias"]
    expected = ("expert 1's trained weights (2 experts) do not fit the network factory's "
                "(differences e.g. [('classifier.bias', (3,))]: parameter 'classifier.bias' is "
                "missing); use experts trained for this network, or delete the directory to retrain")
    with pytest.raises(ExpertError, match="^" + re.escape(expected) + "$"):
        ExpertPool([hand_expert(1), e], tiny)


def test_an_expert_of_another_class_count_is_named():
    other = hand_expert(0, factory=tiny5)
    e = Expert(other.init_state, hand_expert(0).trained_state)
    diff = "[('classifier.bias', (3,)), ('classifier.bias', (5,))]"
    expected = ("expert 0's initial weights (1 experts) do not fit the network factory's "
                f"(differences e.g. {diff}: another architecture or class count); use experts "
                "trained for this network, or delete the directory to retrain")
    with pytest.raises(ExpertError, match="^" + re.escape(expected) + "$"):
        ExpertPool([e], tiny)


# -- on-disk format ------------------------------------------------------------------------------
def test_on_disk_format_and_metadata_round_trip(tmp_path):
    metas = [{"train_accuracy": 50.0, "note": "a"}, {"train_accuracy": 75.0, "test_accuracy": 60.0}]
    experts = [hand_expert(k, metas[k]) for k in range(2)]
    pool_meta = {"dataset": "toy", "arch": "tiny"}
    d = ExpertPool(experts, tiny, seed=7, meta=pool_meta).save(tmp_path / "pool")
    assert sorted(p.name for p in d.iterdir()) == ["expert_0.pt", "expert_1.pt", "manifest.json"]
    assert json.loads((d / "manifest.json").read_text()) == {
        "format": FORMAT, "version": 1, "num_experts": 2, "seed": 7, "meta": pool_meta,
        "experts": metas}
    for k, e in enumerate(experts):
        blob = torch.load(d / f"expert_{k}.pt", weights_only=True)
        assert set(blob) == {"format", "init", "trained", "meta"}
        assert blob["format"] == FORMAT and blob["meta"] == metas[k]
        assert states_equal(blob["init"], e.init_state)
        assert states_equal(blob["trained"], e.trained_state)
    loaded = ExpertPool.load(d, tiny)
    # the pick seed is the caller's (default 0), not the manifest's
    assert loaded.seed == 0 and loaded.meta == pool_meta
    assert [e.meta for e in loaded.experts] == [{**m, "index": k} for k, m in enumerate(metas)]
    again = ExpertPool.load(d, tiny, seed=3)
    assert again.seed == 3 and [again.pick(t) for t in range(12)] == [
        p % 2 for p in [derive_seed(3, 0xE7, t) for t in range(12)]]


def test_load_a_manifest_without_meta(tmp_path):
    d = tmp_path / "pool"
    write_expert_file(d, 0, hand_expert(0, {"train_accuracy": 10.0}))
    write_manifest(d, {"format": FORMAT, "version": 1, "num_experts": 1})
    pool = ExpertPool.load(d, tiny, expect={"arch": "tiny"})
    assert pool.meta == {} and len(pool) == 1


def test_load_a_manifest_without_num_experts_holds_no_expert(tmp_path):
    d = tmp_path / "pool"
    write_expert_file(d, 0, hand_expert(0))
    write_manifest(d, {"format": FORMAT, "meta": {}})
    with pytest.raises(ExpertError, match="^" + re.escape(f"{d} holds no trained expert yet") + "$"):
        ExpertPool.load(d, tiny)


def test_load_mismatch_message_names_the_directory(tmp_path):
    d = ExpertPool([hand_expert(0)], tiny, meta={"arch": "tiny"}).save(tmp_path / "pool")
    expected = (f"the experts in {d} were trained with arch='tiny' but arch='convnet' is asked "
                "for; use a matching directory or another one")
    with pytest.raises(ExpertError, match="^" + re.escape(expected) + "$"):
        ExpertPool.load(d, tiny, expect={"arch": "convnet"})


def test_manifest_errors(tmp_path):
    d = tmp_path / "pool"
    write_manifest(d, {"format": "other", "num_experts": 1})
    path = d / "manifest.json"
    with pytest.raises(ExpertError,
                       match="^" + re.escape(f"{path} is not a dm_plugins expert manifest") + "$"):
        ExpertPool.load(d, tiny)
    path.write_text("[1, 2]")
    with pytest.raises(ExpertError, match="not a dm_plugins expert manifest$"):
        ExpertPool.load(d, tiny)
    path.write_text("{not json")
    with pytest.raises(ExpertError, match="^" + re.escape(f"{path} is not readable JSON (")
                       + r".+\); delete the directory to retrain the experts$"):
        ExpertPool.load(d, tiny)


def test_expert_file_errors(tmp_path):
    d = ExpertPool([hand_expert(0), hand_expert(1)], tiny).save(tmp_path / "pool")
    p1 = d / "expert_1.pt"
    p1.unlink()
    with pytest.raises(ExpertError, match="^" + re.escape(
            f"expert file {p1} is missing; delete {d} to retrain the experts") + "$"):
        ExpertPool.load(d, tiny)
    p1.write_bytes((d / "expert_0.pt").read_bytes()[:100])
    try:                                    # what torch itself raises for the truncated file
        torch.load(p1, weights_only=True)
    except Exception as exc:  # noqa: BLE001
        kind = type(exc).__name__
    assert kind != "NoneType"
    with pytest.raises(ExpertError, match="^" + re.escape(
            f"expert file {p1} is unreadable (truncated or corrupt? {kind}); delete {d} to "
            "retrain") + "$"):
        ExpertPool.load(d, tiny)


def test_an_expert_file_without_meta_loads(tmp_path):
    e = hand_expert(0)
    d = ExpertPool([e], tiny).save(tmp_path / "pool")
    torch.save({"format": FORMAT, "init": e.init_state, "trained": e.trained_state},
               d / "expert_0.pt")
    loaded = ExpertPool.load(d, tiny).experts[0]
    assert loaded.meta == {"index": 0} and states_equal(loaded.trained_state, e.trained_state)


def test_an_expert_file_holding_a_pickled_object_is_refused(tmp_path):
    d = ExpertPool([hand_expert(0)], tiny).save(tmp_path / "pool")
    e = hand_expert(0)
    torch.save({"format": FORMAT, "init": e.init_state, "trained": e.trained_state,
                "meta": {"evil": NotAWeight()}}, d / "expert_0.pt")
    with pytest.raises(ExpertError, match=r"expert_0\.pt is unreadable"):
        ExpertPool.load(d, tiny)


# -- the recipe --------------------------------------------------------------------------------
RECIPE_DEFAULTS = {"num_experts": 5, "epochs": 70, "seed": 0, "lr": 0.01, "momentum": 0.9,
                   "weight_decay": 5e-4, "batch_size": 256, "augment": None, "device": None,
                   "progress": True, "channels_last": False}


def test_recipe_defaults_are_ptlm_s():
    """PTLM's expert recipe: 5 experts, SGD lr 0.01, momentum 0.9, weight decay 5e-4,
    70 epochs, batch 256, seed 0, no augmentation."""
    for fn in (ExpertPool.load_or_train, ExpertPool.train, train_expert):
        params = inspect.signature(fn).parameters
        for name, value in RECIPE_DEFAULTS.items():
            if fn is train_expert and name in ("num_experts", "epochs"):
                continue                   # train_expert has no count and requires epochs
            if fn is train_expert and name == "device":
                assert params[name].default == "cpu"   # the pool resolves the factory's device
                continue
            assert params[name].default == value, (fn.__name__, name)
    assert inspect.signature(train_expert).parameters["desc"].default == "expert"
    assert inspect.signature(ExpertPool.load).parameters["seed"].default == 0


def test_num_experts_below_1_is_refused(toy, tmp_path):
    for call in (lambda: ExpertPool.train(tiny, toy.images, toy.labels, num_experts=0, **FAST),
                 lambda: ExpertPool.load_or_train(tmp_path / "e", tiny, toy.images, toy.labels,
                                                  num_experts=0, **FAST)):
        with pytest.raises(ExpertError, match=r"^num_experts must be >= 1, got 0$"):
            call()
    assert not (tmp_path / "e").exists()
    one = ExpertPool.train(tiny, toy.images, toy.labels, num_experts=1, **FAST)
    assert len(one) == 1


def test_train_records_the_recipe_and_forwards_it(toy, spy):
    x_test, y_test = toy.images[::3], toy.labels[::3]
    pool = ExpertPool.train(tiny, toy.images, toy.labels, num_experts=2, epochs=1, seed=3,
                            lr=0.05, momentum=0.8, weight_decay=1e-3, batch_size=10,
                            augment=scale_augment, test_images=x_test, test_labels=y_test,
                            progress=False, channels_last=True, meta={"dataset": "toy"})
    assert pool.seed == 3
    assert pool.meta == {"epochs": 1, "seed": 3, "lr": 0.05, "momentum": 0.8,
                         "weight_decay": 1e-3, "batch_size": 10,
                         "augment": "scale_augment", "dataset": "toy"}
    check_forwarded(spy, pool, num_experts=2, seed=3, x_test=x_test, y_test=y_test)


def check_forwarded(spy, pool, *, num_experts, seed, x_test, y_test):
    assert len(spy.calls) == num_experts
    for k, (call, e) in enumerate(zip(spy.calls, pool.experts)):
        assert call["epochs"] == 1 and call["lr"] == 0.05 and call["momentum"] == 0.8
        assert call["weight_decay"] == 1e-3 and call["batch_size"] == 10
        assert call["augment"] is scale_augment and call["channels_last"] is True
        assert call["progress"] is False and call["desc"] == f"expert {k + 1}/{num_experts}"
        assert torch.device(call["device"]) == torch.device("cpu")
        # batches and augmentation draw from the (seed, 0x7A, k) stream
        assert torch.equal(call["generator_state"],
                           make_generator(seed, 0x7A, k).get_state())
        # initial weights: a construction under the (seed, 0x1A, k) seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, 0x1A, k))
            assert states_equal(tiny().state_dict(), e.init_state)
        assert e.meta["test_accuracy"] == pytest.approx(
            naive_accuracy(e.trained_state, x_test, y_test))
    accs = [e.meta["test_accuracy"] for e in pool.experts]
    assert pool.mean_test_accuracy() == pytest.approx(sum(accs) / len(accs))


def test_load_or_train_records_the_recipe_and_forwards_it(toy, spy, tmp_path):
    x_test, y_test = toy.images[::3], toy.labels[::3]
    kw = dict(epochs=1, seed=3, lr=0.05, momentum=0.8, weight_decay=1e-3, batch_size=10,
              augment=scale_augment, test_images=x_test, test_labels=y_test, progress=False,
              channels_last=True, meta={"dataset": "toy"})
    d = tmp_path / "nested" / "experts"          # parents are created
    pool = ExpertPool.load_or_train(d, tiny, toy.images, toy.labels, num_experts=2,
                                    augment_name="dsa", **kw)
    recipe = {"epochs": 1, "seed": 3, "lr": 0.05, "momentum": 0.8, "weight_decay": 1e-3,
              "batch_size": 10, "augment": "dsa", "dataset": "toy"}
    assert pool.seed == 3 and pool.meta == recipe
    assert json.loads((d / "manifest.json").read_text())["meta"] == recipe
    check_forwarded(spy, pool, num_experts=2, seed=3, x_test=x_test, y_test=y_test)
    # all cached: same pick seed and metadata, nothing trained
    lines = []
    cached = ExpertPool.load_or_train(d, tiny, toy.images, toy.labels, num_experts=2,
                                      augment_name="dsa", log=lines.append, **kw)
    assert len(spy.calls) == 2 and lines == [f"experts: loaded 2 from {d}"]
    assert cached.seed == 3 and cached.meta == recipe
    # every recorded recipe field is compared on reuse
    for change in ({"lr": 0.1}, {"momentum": 0.5}, {"weight_decay": 0.0},
                   {"augment_name": "flip"}):
        args = {**kw, "augment_name": "dsa", **change}
        key, value = next(iter(change.items()))
        key = "augment" if key == "augment_name" else key
        expected = (f"the experts in {d} were trained with {key}={recipe[key]!r} but "
                    f"{key}={value!r} is asked for; use a matching directory or another one")
        with pytest.raises(ExpertError, match="^" + re.escape(expected) + "$"):
            ExpertPool.load_or_train(d, tiny, toy.images, toy.labels, num_experts=2, **args)


def test_the_augmentation_name_is_recorded_automatically(toy):
    def pool_with(augment, **extra):
        return ExpertPool.train(tiny, toy.images, toy.labels, num_experts=1, augment=augment,
                                **FAST, **extra)
    assert pool_with(None).meta["augment"] == "none"
    assert pool_with(scale_augment).meta["augment"] == "scale_augment"
    assert pool_with(CallableAugment()).meta["augment"] == "CallableAugment"
    assert pool_with(functools.partial(scale_augment)).meta["augment"] == "partial"


def test_load_or_train_names_a_nameless_augmentation(toy, tmp_path):
    pool = ExpertPool.load_or_train(tmp_path / "e", tiny, toy.images, toy.labels,
                                    num_experts=1, augment=CallableAugment(), **FAST)
    assert pool.meta["augment"] == "CallableAugment"


def test_the_stored_meta_is_kept_when_everything_is_cached(toy, tmp_path):
    d = tmp_path / "e"
    first = ExpertPool.load_or_train(d, tiny, toy.images, toy.labels, num_experts=1,
                                     meta={"dataset": "toy", "arch": "tiny"}, **FAST)
    again = ExpertPool.load_or_train(d, tiny, toy.images, toy.labels, num_experts=1, **FAST)
    assert again.meta == first.meta and again.meta["dataset"] == "toy"
    assert again.seed == 0


def test_log_lines_when_training(toy, tmp_path):
    d, lines = tmp_path / "e", []
    pool = ExpertPool.load_or_train(d, tiny, toy.images, toy.labels, num_experts=1,
                                    log=lines.append, **FAST)
    acc = pool.experts[0].meta["train_accuracy"]
    # without a progress bar, a heartbeat line per epoch (one epoch here) in between
    assert [lines[0], lines[-1]] == [
        f"experts: training 1 of 1 for 1 epochs (saved to {d} one by one)",
        f"experts: expert 0 trained, train accuracy {acc:.1f}%"]
    assert len(lines) == 3 and lines[1].startswith("experts: expert 1/1, epoch 1/1: loss ")
    assert f"train_accuracy {round(acc, 1)}" in lines[1] and "ETA 0s" in lines[1]
    lines.clear()
    pool = ExpertPool.load_or_train(tmp_path / "t", tiny, toy.images, toy.labels,
                                    num_experts=1, log=lines.append,
                                    test_images=toy.images, test_labels=toy.labels, **FAST)
    acc = pool.experts[0].meta["test_accuracy"]
    assert lines[-1] == f"experts: expert 0 trained, test accuracy {acc:.1f}%"


def test_accuracy_text_without_a_train_accuracy():
    # unreachable through load_or_train (trained experts always carry one): checked directly
    e = hand_expert(0)
    assert _accuracy_text(e) == "train accuracy nan%"
    e.meta["test_accuracy"] = 87.54
    assert _accuracy_text(e) == "test accuracy 87.5%"


# -- which directories load_or_train accepts -------------------------------------------------------
def test_leftover_and_hidden_files_are_accepted(toy, tmp_path):
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / ".lock").write_text("")
    assert len(ExpertPool.load_or_train(hidden, tiny, toy.images, toy.labels,
                                        num_experts=1, **FAST)) == 1
    leftover = tmp_path / "leftover"           # an interrupted first save: no manifest yet
    write_expert_file(leftover, 0, hand_expert(0))
    pool = ExpertPool.load_or_train(leftover, tiny, toy.images, toy.labels, num_experts=1,
                                    **FAST)
    assert not states_equal(pool.experts[0].init_state, hand_expert(0).init_state)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ExpertError, match="^" + re.escape(
            f"{tmp_path / 'other'} exists but holds no expert pool (no manifest.json); point to "
            "an empty or new directory") + "$"):
        ExpertPool.load_or_train(tmp_path / "other", tiny, toy.images, toy.labels,
                                 num_experts=1, **FAST)


def test_a_manifest_without_meta_or_count(toy, tmp_path):
    # without "meta": nothing to compare, the expert is reused
    d = tmp_path / "nometa"
    stored = hand_expert(0, {"train_accuracy": 10.0})
    write_expert_file(d, 0, stored)
    write_manifest(d, {"format": FORMAT, "version": 1, "num_experts": 1})
    pool = ExpertPool.load_or_train(d, tiny, toy.images, toy.labels, num_experts=1, **FAST)
    assert states_equal(pool.experts[0].init_state, stored.init_state)
    assert pool.meta == {"epochs": 1, "seed": 0, "lr": 0.01, "momentum": 0.9,
                         "weight_decay": 5e-4, "batch_size": 12, "augment": "none"}
    # without "num_experts": no expert counts as trained, expert 0 is retrained
    d = tmp_path / "nocount"
    write_expert_file(d, 0, stored)
    write_manifest(d, {"format": FORMAT, "version": 1})
    pool = ExpertPool.load_or_train(d, tiny, toy.images, toy.labels, num_experts=1, **FAST)
    fresh = train_expert(tiny, toy.images, toy.labels, index=0, epochs=1, batch_size=12,
                         progress=False)
    assert states_equal(pool.experts[0].init_state, fresh.init_state)
    assert states_equal(pool.experts[0].trained_state, fresh.trained_state)


def test_experts_with_identical_starts_are_refused_whichever_pair(toy):
    """Expert 0 differs, experts 1 and 2 start equal: the check compares every pair."""
    calls = []

    def factory():
        calls.append(None)
        net = torch.nn.Linear(64, 3)
        net.reset_parameters = None              # not re-drawn by reinitialize_
        with torch.no_grad():
            net.weight.fill_(0.01 if len(calls) == 1 else 0.02)
            net.bias.zero_()
        return torch.nn.Sequential(torch.nn.Flatten(), net)

    with pytest.raises(ExpertError, match=r"^experts 1 and 2 start from identical weights"):
        # device given: no probe call of the factory (the call count decides the weights)
        ExpertPool.train(factory, toy.images, toy.labels, num_experts=3, device="cpu", **FAST)


# -- train_expert ---------------------------------------------------------------------------------
def test_train_expert_meta_and_default_device(toy, spy):
    # no device given: the default must be a valid one
    e = train_expert(tiny, toy.images, toy.labels, index=2, epochs=1, progress=False)
    assert spy.calls[0]["batch_size"] == 256 and spy.calls[0]["lr"] == 0.01
    assert torch.equal(spy.calls[0]["generator_state"], make_generator(0, 0x7A, 2).get_state())
    assert e.meta == {"index": 2, "epochs": 1, "train_accuracy": spy.returned[0]}
    kw = dict(index=0, epochs=1, batch_size=12, progress=False)
    only_images = train_expert(tiny, toy.images, toy.labels, test_images=toy.images, **kw)
    only_labels = train_expert(tiny, toy.images, toy.labels, test_labels=toy.labels, **kw)
    assert "test_accuracy" not in only_images.meta and "test_accuracy" not in only_labels.meta


def test_mean_test_accuracy():
    experts = [hand_expert(0, {"test_accuracy": 50.0}), hand_expert(1, {"test_accuracy": 100.0}),
               hand_expert(2, {"train_accuracy": 20.0})]
    assert ExpertPool(experts, tiny).mean_test_accuracy() == 75.0
    assert math.isnan(ExpertPool(experts[2:], tiny).mean_test_accuracy())


# -- CUDA (skipped without a GPU): placement and the per-device caches ---------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_placement_and_caches_on_cuda(toy, spy, tmp_path):
    d = tmp_path / "e"
    pool = ExpertPool.load_or_train(d, tiny, toy.images, toy.labels, num_experts=1,
                                    device="cuda", test_images=toy.images,
                                    test_labels=toy.labels, **FAST)
    assert [torch.device(c["device"]).type for c in spy.calls] == ["cuda"]
    e = pool.experts[0]
    assert {t.device.type for t in [*e.init_state.values(), *e.trained_state.values()]} == {"cpu"}
    ExpertPool.train(tiny, toy.images, toy.labels, num_experts=1, device="cuda", **FAST)
    assert torch.device(spy.calls[-1]["device"]).type == "cuda"
    assert all(p.is_cuda for p in pool.network("cuda").parameters())
    cpu_pair, cuda_pair = pool.parameter_pair(0), pool.parameter_pair(0, "cuda")
    assert all(t.device.type == "cpu" for t in cpu_pair[0] + cpu_pair[1])
    assert all(t.is_cuda for t in cuda_pair[0] + cuda_pair[1])
    cpu_net, cuda_net = pool.trained_network(0), pool.trained_network(0, "cuda")
    assert cuda_net is not cpu_net and all(p.is_cuda for p in cuda_net.parameters())
    assert all(not p.is_cuda for p in cpu_net.parameters())
    # a file written from CUDA tensors loads onto the CPU
    write_expert_file(d, 0, Expert({n: t.cuda() for n, t in e.init_state.items()},
                                   {n: t.cuda() for n, t in e.trained_state.items()}, e.meta))
    loaded = ExpertPool.load(d, tiny).experts[0]
    assert {t.device.type for t in [*loaded.init_state.values(),
                                    *loaded.trained_state.values()]} == {"cpu"}


def test_experts_train_where_the_factory_builds_its_networks(monkeypatch):
    from dm_plugins.experts import factory_device
    from dm_plugins.experts import training as experts_module
    from tests.conftest import TinyNet
    assert factory_device(lambda: TinyNet(num_classes=2)) == torch.device("cpu")
    seen = []
    real_train = experts_module.train_expert
    monkeypatch.setattr(experts_module, "factory_device", lambda factory: torch.device("meta"))

    def spy(*args, device, **kwargs):
        seen.append(torch.device(device))
        return real_train(*args, device="cpu", **kwargs)
    monkeypatch.setattr(experts_module, "train_expert", spy)
    images, labels = torch.randn(8, 1, 8, 8), torch.arange(2).repeat(4)
    ExpertPool.train(lambda: TinyNet(num_classes=2), images, labels, num_experts=1, epochs=1,
                     progress=False)
    ExpertPool.train(lambda: TinyNet(num_classes=2), images, labels, num_experts=1, epochs=1,
                     progress=False, device="cpu")
    assert seen == [torch.device("meta"), torch.device("cpu")]


def test_the_manifest_describes_the_network_and_the_data_without_meta(toy, tmp_path):
    d = tmp_path / "pool"
    ExpertPool.load_or_train(d, tiny, toy.images, toy.labels, num_experts=1, **FAST)
    manifest = json.loads((d / "manifest.json").read_text())
    net = tiny()
    assert manifest["described"] == {
        "network": type(net).__name__, "parameters": sum(p.numel() for p in net.parameters()),
        "train_images": toy.images.shape[0], "image_shape": list(toy.images.shape[1:]),
        "num_classes": 3}
    assert "batch_size" in manifest["meta"]                 # the recipe, compared on reuse
    pool = ExpertPool.load(d, tiny)                          # reuse in one call
    assert len(pool) == 1 and pool.meta["batch_size"] == manifest["meta"]["batch_size"]
