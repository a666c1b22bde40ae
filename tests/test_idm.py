"""IDM as a host (baselines/methods/idm.py), its plugin adapter (adapters/idm.py) and its
command line (baselines/idm.py): the queue, the class-aware term, the per-class image steps,
each plugin's replace/add statement, resume, and the CLI on the embedded digits set."""
import itertools
import json
from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from adapters.idm import IDMHost
from baselines import idm as idm_cli
from baselines.harness.factorization import decode, mosaic_init
from baselines.harness.synset import load_synset
from baselines.methods.idm import IDM
from dm_plugins import PluginSet
from tests.conftest import group_scale_augment, killed_at, straight_and_resumed

C, IPC, T = 3, 1, 4
SUBSETS = [c for r in range(4) for c in itertools.combinations(["cap", "ptm", "plm"], r)]


def make_host(toy, factory, cls=IDM, plugins=None, **overrides):
    """A tiny IDM: 2x2 partition on 8 px toy images, 5-image real batches, small queue."""
    g = torch.Generator().manual_seed(3)
    syn = torch.cat([mosaic_init(toy.sample(c, 4 * IPC, g), 2) for c in range(C)])
    settings = dict(num_iterations=T, augment=group_scale_augment,
                    decode=partial(decode, factor=2), batch_real=5, lr=0.2, momentum=0.5,
                    ce_weight=0.5, net_num=5, net_generate_interval=2, model_train_steps=2,
                    trained_bs=6, meter_interval=3, seed=0)
    settings.update(overrides)
    if cls is IDM:
        return IDM(toy, factory, syn, **settings)
    return cls(toy, factory, syn, plugins=plugins, **settings)


def queue_state(host):
    return host.queue.state_dict()


def assert_same_queue(a, b):
    sa, sb = queue_state(a), queue_state(b)
    assert sa["next_serial"] == sb["next_serial"]
    assert len(sa["nets"]) == len(sb["nets"])
    for x, y in zip(sa["nets"], sb["nets"]):
        assert (x["serial"], x["correct"], x["seen"]) == (y["serial"], y["correct"], y["seen"])
        for name in x["weights"]:
            assert torch.equal(x["weights"][name], y["weights"][name]), name
        for pid, st in x["optimizer"]["state"].items():
            other = y["optimizer"]["state"][pid]
            assert torch.equal(st["momentum_buffer"], other["momentum_buffer"])


def first_pass(host, t=0):
    """Iteration t's first matching pass, set up but not stepped."""
    host.start()
    host.prepare_iteration(t)
    return host.prepare_pass(t, 0, host.queue[host.matching_picks(t)[0]])


# -- the queue --------------------------------------------------------------------------------
def test_queue_starts_with_three_nets_and_evicts_fifo(toy, tiny_factory):
    host = make_host(toy, tiny_factory, net_num=5, net_generate_interval=1)
    assert host.queue.serials == [0, 1, 2]
    seen = []
    for t in range(5):
        metrics = host.step(t)
        seen.append(host.queue.serials)
        assert metrics["queue_size"] == len(host.queue)
    assert seen == [[0, 1, 2, 3], [0, 1, 2, 3, 4], [1, 2, 3, 4, 5], [2, 3, 4, 5, 6],
                    [3, 4, 5, 6, 7]]
    sparse = make_host(toy, tiny_factory, net_num=5, net_generate_interval=2)
    for t in range(5):
        sparse.step(t)
    assert sparse.queue.serials == [1, 2, 3, 4, 5]          # pushed at t = 0, 2, 4


def test_queue_nets_are_initialised_from_the_seed_and_their_serial(toy, tiny_factory):
    a = make_host(toy, tiny_factory)
    b = make_host(toy, tiny_factory)
    for x, y in zip(a.queue, b.queue):
        for p, q in zip(x.net.parameters(), y.net.parameters()):
            assert torch.equal(p, q)
    w = [e.net.features[0].weight for e in a.queue]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])


def test_only_the_drawn_nets_are_trained_and_on_unaugmented_real_images(toy, tiny_factory):
    aug_calls = []

    def spy_augment(x, groups, g):
        aug_calls.append(x.shape[0])
        return group_scale_augment(x, groups, g)

    host = make_host(toy, tiny_factory, augment=spy_augment, net_generate_interval=5,
                     fetch_net_num=2)
    host.step(0)                                            # queue: 4 nets
    before = [{n: p.clone() for n, p in e.net.named_parameters()} for e in host.queue]
    inputs = {i: [] for i in range(len(host.queue))}
    for i, entry in enumerate(host.queue):
        def spy(x, _orig=entry.net.forward, _i=i):
            inputs[_i].append(x.detach().clone())
            return _orig(x)
        entry.net.forward = spy
    aug_calls.clear()
    host.step(1)
    trained = set(host.training_picks(1))
    changed = {i for i, e in enumerate(host.queue)
               if any(not torch.equal(p, before[i][n]) for n, p in e.net.named_parameters())}
    assert len(trained) == 2 and changed == trained
    assert {i for i, batches in inputs.items() if batches} == trained
    for i in trained:
        assert len(inputs[i]) == host.model_train_steps
        for x in inputs[i]:
            assert x.shape[0] == host.trained_bs
            # every row is a real image exactly as stored: no augmentation
            same = (x.flatten(1)[:, None, :] == toy.images.flatten(1)[None]).all(-1)
            assert bool(same.any(1).all())
    assert len(aug_calls) == 2 * C                          # the matching pass only
    assert sum(e.seen for e in host.queue) == 2 * 2 * host.model_train_steps * host.trained_bs


def test_ce_weight_is_accuracy_in_percent_and_meters_reset_at_the_interval(toy, tiny_factory):
    host = make_host(toy, tiny_factory, ce_weight=0.5, meter_interval=3)
    host.step(0)
    host.step(1)
    p = first_pass(host, 2)
    assert 0.0 <= p.queue_net.accuracy <= 100.0
    assert p.ce_scale == 0.5 * p.queue_net.accuracy
    p.queue_net.correct, p.queue_net.seen = 3, 4            # 75 %
    p = host.prepare_pass(2, 0, p.queue_net)
    assert p.ce_scale == 37.5
    total, parts = host.class_loss(p, 0)
    torch.testing.assert_close(total, parts["match"] + 37.5 * parts["ce_raw"])
    assert parts["ce"] == parts["ce_raw"] * 37.5
    host.train_queue(2)
    host.iteration = 3
    assert any(e.seen for e in host.queue)
    metrics = host.step(3)                                  # 3 % meter_interval == 0: reset first
    assert metrics["ce_scale"] == 0.0 and metrics["loss_ce"] == 0.0
    assert [e.seen for e in host.queue if e.seen] == [host.model_train_steps * host.trained_bs] * 2


def test_a_net_with_no_training_since_the_reset_has_weight_zero(toy, tiny_factory):
    host = make_host(toy, tiny_factory, fetch_net_num=0)
    metrics = host.step(0)
    assert metrics["ce_scale"] == 0.0 and metrics["loss_ce"] == 0.0 and metrics["ce"] > 0
    assert metrics["loss"] == pytest.approx(metrics["loss_match"])


# -- the image update -------------------------------------------------------------------------
def test_per_class_steps_share_one_momentum_buffer(toy, tiny_factory):
    lr, momentum = 0.2, 0.5
    stepped = make_host(toy, tiny_factory, lr=lr, momentum=momentum)
    for t in range(2):
        stepped.step(t)

    by_hand = make_host(toy, tiny_factory, lr=lr, momentum=momentum)
    by_hand.start()
    buf = torch.zeros_like(by_hand.syn)
    moved_other_classes = False
    for t in range(2):
        by_hand.prepare_iteration(t)
        for k, index in enumerate(by_hand.matching_picks(t)):
            p = by_hand.prepare_pass(t, k, by_hand.queue[index])
            for c in range(C):
                total, _ = by_hand.class_loss(p, c)
                (grad,) = torch.autograd.grad(total, by_hand.syn)
                rows = torch.arange(C * IPC) // IPC == c
                assert bool((grad[~rows] == 0).all())      # only class c's loss
                buf = momentum * buf + grad                 # one buffer over all images
                moved_other_classes |= bool((buf[~rows] != 0).any())
                with torch.no_grad():
                    by_hand.syn -= lr * buf
        by_hand.train_queue(t)
    assert moved_other_classes
    torch.testing.assert_close(stepped.syn, by_hand.syn, rtol=1e-6, atol=1e-7)


def test_partition_order_is_a_permutation_of_the_reference_quadrant_order(toy, tiny_factory):
    """The reference lists decoded quadrants quadrant-major, TL, BL, TR, BR; the harness lists
    them image-major, TL, TR, BL, BR. Same images, and the class loss does not see the order."""
    stored = torch.randn(2, 1, 8, 8)
    ours, labels = decode(stored, torch.tensor([0, 0]), 2)
    h = 4
    quadrants = [stored[:, :, :h, :h], stored[:, :, h:, :h], stored[:, :, :h, h:],
                 stored[:, :, h:, h:]]                      # TL, BL, TR, BR
    ref = torch.cat([F.interpolate(q, scale_factor=2, mode="bilinear", align_corners=False)
                     for q in quadrants])
    cell_of = [0, 2, 1, 3]                                  # reference quadrant -> our cell
    for q in range(4):
        for k in range(2):
            assert torch.equal(ref[q * 2 + k], ours[k * 4 + cell_of[q]])
    net = tiny_factory()
    torch.testing.assert_close(net.embed(ours).mean(0), net.embed(ref).mean(0))
    downscaled = F.interpolate(toy.images[:1], scale_factor=0.5, mode="bilinear",
                               align_corners=False)
    mosaic = mosaic_init(toy.images[:4], 2)
    torch.testing.assert_close(mosaic[:, :, :h, :h], downscaled)


# -- the adapter ------------------------------------------------------------------------------
def test_adapter_without_plugins_equals_the_bare_method(toy, tiny_factory):
    bare, grafted = make_host(toy, tiny_factory), make_host(toy, tiny_factory, IDMHost)
    passes = {bare: first_pass(bare), grafted: first_pass(grafted)}
    for c in range(C):
        losses, grads = [], []
        for host, p in passes.items():
            host.syn.grad = None
            total, _ = host.class_loss(p, c)
            total.backward()
            losses.append(total.detach())
            grads.append(host.syn.grad.clone())
        assert torch.equal(losses[0], losses[1]) and torch.equal(grads[0], grads[1])
    grafted.close()

    bare, grafted = make_host(toy, tiny_factory), make_host(toy, tiny_factory, IDMHost)
    for t in range(T):
        a, b = bare.step(t), grafted.step(t)
        a.pop("seconds"), b.pop("seconds")
        assert a == b
    assert torch.equal(bare.syn, grafted.syn)
    assert_same_queue(bare, grafted)
    grafted.close()


@pytest.mark.parametrize("subset", SUBSETS, ids=lambda s: ",".join(s) or "none")
def test_every_plugin_subset_runs_exactly_its_hooks(subset, toy, tiny_factory, pool,
                                                    hook_calls):
    calls = hook_calls
    plugins = PluginSet.from_names(",".join(subset) or "none", experts=pool)
    host = make_host(toy, tiny_factory, IDMHost, plugins, num_iterations=2)
    host.run(progress=False)
    assert {n for n, k in calls.items() if k} == set(subset)
    expected = {"cap": 2 * C, "ptm": 2, "plm": 2 * C}       # per class / per pass, 2 iterations
    for name in subset:
        assert calls[name] == expected[name]
    assert host.plugins.context is None                     # torn down


def test_two_matching_passes_call_the_hooks_per_pass(toy, tiny_factory, pool, hook_calls):
    calls = hook_calls
    plugins = PluginSet.from_names("cap,ptm,plm", experts=pool)
    host = make_host(toy, tiny_factory, IDMHost, plugins, num_iterations=2, train_net_num=2)
    host.run(progress=False)
    assert calls == {"cap": 2 * 2 * C, "ptm": 2 * 2, "plm": 2 * 2 * C}


@pytest.mark.parametrize("spec", ["ptm", "cap,ptm,plm"])
def test_ptm_replaces_the_matching_features_only_and_leaves_the_queue_bit_identical(
        spec, toy, tiny_factory, pool):
    bare = make_host(toy, tiny_factory)
    grafted = make_host(toy, tiny_factory, IDMHost, PluginSet.from_names(spec, experts=pool))
    # t = 0, class 0: same stored images, same queue net -> the same CE through the queue net,
    # while the matched features come from ptm's own network
    pa, pb = first_pass(bare), first_pass(grafted)
    ptm_net = grafted.plugins.pm.get_plugin("ptm").network
    assert pb.extractor is ptm_net and pa.extractor is pa.queue_net.net
    assert all(ptm_net is not e.net for e in grafted.queue)
    _, a = bare.class_loss(pa, 0)
    _, b = grafted.class_loss(pb, 0)
    assert torch.equal(a["ce_raw"], b["ce_raw"]) and not torch.equal(a["match"], b["match"])
    grafted.close()

    bare, grafted = make_host(toy, tiny_factory), make_host(
        toy, tiny_factory, IDMHost, PluginSet.from_names(spec, experts=pool))
    for t in range(T):
        ma, mb = bare.step(t), grafted.step(t)
        assert ma["ce_scale"] == mb["ce_scale"]             # the queue net's accuracy
    grafted.close()
    assert not torch.equal(bare.syn, grafted.syn)
    assert_same_queue(bare, grafted)


def test_cap_filters_the_matching_real_batch_only(toy, tiny_factory, pool):
    bare = make_host(toy, tiny_factory)
    grafted = make_host(toy, tiny_factory, IDMHost, PluginSet.from_names("cap"))
    pa, pb = first_pass(bare), first_pass(grafted)
    for c in range(C):
        _, a = bare.class_loss(pa, c)
        _, b = grafted.class_loss(pb, c)
        assert a["kept"] == bare.batch_real and b["kept"] < bare.batch_real   # t = 0: s_min out
        assert torch.equal(a["ce_raw"], b["ce_raw"])
        assert not torch.equal(a["match"], b["match"])
    grafted.close()
    metrics = make_host(toy, tiny_factory, IDMHost, PluginSet.from_names("cap")).step(0)
    assert metrics["real_kept"] < 1.0


def test_plm_adds_its_loss_next_to_idms_ce(toy, tiny_factory, pool):
    bare = make_host(toy, tiny_factory)
    grafted = make_host(toy, tiny_factory, IDMHost, PluginSet.from_names("plm", experts=pool))
    bare.step(0), grafted.step(0)                            # nets trained: CE weight > 0
    bare.syn.data.copy_(grafted.syn.data)
    pa, pb = first_pass(bare, 1), first_pass(grafted, 1)
    assert pa.ce_scale == pb.ce_scale > 0
    for c in range(C):
        ta, a = bare.class_loss(pa, c)
        tb, b = grafted.class_loss(pb, c)
        assert torch.equal(a["ce"], b["ce"]) and torch.equal(a["match"], b["match"])
        assert b["plm"] > 0
        torch.testing.assert_close(tb, ta + b["plm"])
    grafted.close()


# -- resume -----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["none", "cap,ptm,plm"])
def test_resume_from_the_state_dict_equals_an_uninterrupted_run(spec, toy, tiny_factory, pool):
    def host():
        return make_host(toy, tiny_factory, IDMHost, PluginSet.from_names(spec, experts=pool),
                         meter_interval=2)
    straight, resumed = straight_and_resumed(host)
    assert torch.equal(straight.syn, resumed.syn)
    assert_same_queue(straight, resumed)


# -- the command line -------------------------------------------------------------------------
TINY = ["--ipc", "1", "--iterations", "3", "--batch-real", "8", "--trained-bs", "8",
        "--model-train-steps", "1", "--eval-runs", "1", "--eval-epochs", "2",
        "--num-experts", "2", "--expert-epochs", "1", "--checkpoint-every", "2",
        "--log-every", "1", "--no-progress", "--device", "cpu"]


@pytest.mark.parametrize("spec", ["none", "cap,ptm,plm"])
def test_cli_runs_on_digits_and_writes_the_run_directory(spec, tmp_path, capsys,
                                                          random_experts):
    out = tmp_path / "run"
    assert idm_cli.main(TINY + ["--plugins", spec, "--out", str(out)]) == 0
    assert {"config.json", "synthetic.pt", "grid.png", "metrics.jsonl", "results.json",
            "run.log", "checkpoint.pt"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    plugins = [] if spec == "none" else spec.split(",")
    assert config["method"] == "idm" and config["plugins"] == plugins
    assert (config["factor"], config["lr_img"], config["momentum"]) == (2, 0.2, 0.5)
    assert (config["ce_weight"], config["net_generate_interval"], config["net_num"],
            config["train_net_num"], config["fetch_net_num"], config["meter_interval"]) == \
        (0.5, 5, 100, 1, 2, 100)
    assert config["sources"]["ce_weight"] == "method idm"
    assert config["sources"]["trained_bs"] == "command line"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1, 2]
    for r in records:
        assert {"loss", "loss_match", "loss_ce", "ce_scale", "queue_size", "seconds"} <= set(r)
        assert ("loss_plm" in r) == ("plm" in plugins)
    assert records[0]["queue_size"] == 4
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["accuracy_mean"] <= 100 and results["method"] == "idm"
    synset = load_synset(out / "synthetic.pt")
    assert synset.images.shape == (10, 1, 32, 32)
    assert synset.meta["method"] == "idm" and synset.meta["factor"] == 2
    assert "evaluation convnet" in capsys.readouterr().out


def test_cli_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    args = TINY + ["--iterations", "4", "--eval-runs", "0", "--meter-interval", "3"]
    assert idm_cli.main(args + ["--out", str(tmp_path / "straight")]) == 0
    with killed_at(IDM, 3):
        assert idm_cli.main(args + ["--out", str(tmp_path / "cut")]) == 130
    assert idm_cli.main(["--resume", str(tmp_path / "cut"), "--no-progress",
                         "--device", "cpu"]) == 0
    a = load_synset(tmp_path / "straight" / "synthetic.pt").images
    b = load_synset(tmp_path / "cut" / "synthetic.pt").images
    assert torch.equal(a, b)
    assert "resumed at iteration 2 of 4" in (tmp_path / "cut" / "run.log").read_text()


def test_cli_one_line_error_for_a_bad_idm_setting(tmp_path, capsys):
    assert idm_cli.main(TINY + ["--net-num", "0", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--net-num" in err and "\n" not in err


def test_reference_defaults_per_dataset_and_ipc():
    def value(key, name, ipc):
        return idm_cli.reference_setting(key, SimpleNamespace(name=name), {"ipc": ipc})
    assert [value("ce_weight", "cifar10", i) for i in (1, 10, 50)] == [0.5, 0.5, 0.1]
    assert [value("batch_real", "cifar10", i) for i in (1, 10, 50)] == [5000, 256, 256]
    assert [value("net_generate_interval", "cifar10", i) for i in (1, 10, 50)] == [5, 30, 30]
    assert [value("meter_interval", "cifar10", i) for i in (1, 10, 50)] == [100, 100, 500]
    assert [value("ce_weight", "cifar100", i) for i in (1, 10, 50)] == [0.5, 0.1, 0.1]
    assert value("ce_weight", "imagefolder:/x/cifar10-subset", 10) == 0.5
    text = " ".join(idm_cli.build_parser().format_help().split())
    assert "{idm,ptlm,iid}" in text and "--net-generate-interval" in text
    assert "default 30, or 5 at IPC 1 on CIFAR" in text and "default: None" not in text
