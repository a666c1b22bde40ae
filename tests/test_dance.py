"""DANCE as a host (baselines/methods/dance.py), its plugin adapter (adapters/dance.py), IDC's
whole-strategy augmentation (DSA.sequence) and the command line (baselines/dance.py): the middle
model, both views' per-class steps against a hand-written iteration, clamping, each plugin's
replace/add statement, resume, and the CLI on the embedded digits set."""
import itertools
import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from adapters.dance import DANCEHost
from baselines import dance as dance_cli
from baselines.harness.dsa import DSA
from baselines.harness.factorization import decode, mosaic_init
from baselines.harness.synset import load_synset
from baselines.methods import dance as dance_module
from baselines.methods.dance import DANCE, middle_ratio
from dm_plugins import PluginSet
from dm_plugins.manager import HookNeverCalled
from dm_plugins.seeding import make_generator
from tests.conftest import count_calls, group_scale_augment, killed_at, straight_and_resumed

C, IPC, T = 3, 1, 4
SUBSETS = [c for r in range(4) for c in itertools.combinations(["cap", "ptm", "plm"], r)]
MEAN, STD = 0.5, 0.25


def normalize(x):
    return (x - MEAN) / STD


def pixel_init(toy):
    g = torch.Generator().manual_seed(3)
    stored = torch.cat([mosaic_init(toy.sample(c, 4 * IPC, g), 2) for c in range(C)])
    return (stored * STD + MEAN).clamp(0, 1)


def make_host(toy, pool, cls=DANCE, plugins=None, **overrides):
    """A tiny DANCE: factor-2 formation on 8 px toy images, 5-image real batches."""
    settings = dict(normalize=normalize, num_iterations=T, augment=group_scale_augment,
                    decode=partial(decode, factor=2), batch_real=5, lr=0.05, momentum=0.5,
                    seed=0)
    settings.update(overrides)
    if cls is DANCE:
        return DANCE(toy, pool, pixel_init(toy), **settings)
    return cls(toy, pool, pixel_init(toy), plugins=plugins, **settings)


def expert_states(pool):
    return [({k: v.clone() for k, v in e.init_state.items()},
             {k: v.clone() for k, v in e.trained_state.items()}) for e in pool.experts]


# -- the method -------------------------------------------------------------------------------
def test_middle_model_is_the_stated_convex_combination(toy, pool):
    host = make_host(toy, pool)
    before = expert_states(pool)
    mixes = []
    for t in range(3):
        mix = host.mixing_weight(t)
        mixes.append(mix)
        assert 0.0 <= mix < 1.0
        expert = pool.experts[pool.pick(t)]
        net = host.middle_model(t)
        for name, p in net.named_parameters():
            expected = mix * expert.init_state[name] + (1 - mix) * expert.trained_state[name]
            torch.testing.assert_close(p, expected, rtol=1e-6, atol=1e-6)
    assert len(set(mixes)) == 3                          # a new l every iteration
    assert middle_ratio(0.25) == 0.75
    for (i0, s0), e in zip(before, pool.experts):        # the experts are never written
        assert all(torch.equal(i0[k], e.init_state[k]) for k in i0)
        assert all(torch.equal(s0[k], e.trained_state[k]) for k in s0)


def _net_with(tiny_factory, state):
    net = tiny_factory()
    net.load_state_dict(state)
    return net


def test_two_iterations_equal_a_hand_written_dance(toy, pool, tiny_factory):
    """Independent reimplementation: clamp, middle model from the experts' state dicts, per-class
    matching steps then per-class hard-label CE steps through the trained expert, SGD momentum
    written out (buf = m * buf + grad; x -= lr * buf), one buffer for every stored image."""
    lr, m = 0.05, 0.5
    host = make_host(toy, pool, augment=None, lr=lr, momentum=m)
    start = pixel_init(toy)
    start[0, 0, 0, :3] = torch.tensor([-0.5, 1.7, 0.3])     # outside [0, 1]: clamped first
    with torch.no_grad():
        host.syn.copy_(start)
    x, buf = start.clone(), None

    def sgd(x, grad, buf):
        buf = grad.clone() if buf is None else m * buf + grad
        return x - lr * buf, buf

    for t in range(2):
        x = x.clamp(0, 1)
        mix = float(torch.rand((), generator=make_generator(0, dance_module._MIX_STREAM, t)))
        k = pool.pick(t)
        e = pool.experts[k]
        middle = _net_with(tiny_factory, {n: mix * e.init_state[n] + (1 - mix) *
                                          e.trained_state[n] for n in e.init_state})
        expert = _net_with(tiny_factory, e.trained_state)
        for c in range(C):
            real = toy.sample(c, 5, make_generator(0, dance_module._REAL_STREAM, t, c))
            leaf = x.clone().requires_grad_(True)
            syn, _ = decode(leaf[c:c + 1], torch.tensor([c]), factor=2)
            loss = ((middle.embed(real).mean(0)                # real data: normalised already
                     - middle.embed(normalize(syn)).mean(0)) ** 2).sum()
            loss.backward()
            x, buf = sgd(x, leaf.grad, buf)
        for c in range(C):
            leaf = x.clone().requires_grad_(True)
            syn, labels = decode(leaf[c:c + 1], torch.tensor([c]), factor=2)
            F.cross_entropy(expert(normalize(syn)), labels).backward()
            x, buf = sgd(x, leaf.grad, buf)
        metrics = host.step(t)
        torch.testing.assert_close(host.syn.detach(), x, rtol=1e-5, atol=1e-6)
        assert metrics["expert"] == k and metrics["mix"] == mix


def test_clamping_at_every_iteration_and_on_return(toy, pool):
    host = make_host(toy, pool, lr=50.0, num_iterations=2)   # huge steps leave [0, 1]
    host.step(0)
    assert host.syn.detach().min() < 0 or host.syn.detach().max() > 1
    seen = {}
    real_inner = DANCE.inner_class_loss

    def spy(self, extractor, c, t, parts=None):
        if c == 0:
            seen[t] = self.syn.detach().clone()
        return real_inner(self, extractor, c, t, parts)

    host.inner_class_loss = spy.__get__(host)
    out = host.run(progress=False)
    assert seen[1].min() >= 0 and seen[1].max() <= 1        # clamped before the step
    assert out.min() >= 0 and out.max() <= 1                # and on return
    assert not (host.syn.detach().min() >= 0 and host.syn.detach().max() <= 1)


def test_inter_class_step_uses_the_trained_expert_and_hard_labels(toy, pool, tiny_factory):
    host = make_host(toy, pool)
    images = normalize(pixel_init(toy))[:2]
    labels = torch.tensor([0, 2])
    for t in range(3):
        trained = _net_with(tiny_factory, pool.experts[pool.pick(t)].trained_state)
        losses = host.inter_class_losses(images, labels, t)
        assert set(losses) == {"ce"}
        torch.testing.assert_close(losses["ce"], F.cross_entropy(trained(images), labels))
        init = _net_with(tiny_factory, pool.experts[pool.pick(t)].init_state)
        assert not torch.allclose(losses["ce"], F.cross_entropy(init(images), labels))


def test_per_class_steps_of_both_views_and_iter_calib(toy, pool):
    for iter_calib, steps in ((1, 2 * C), (2, 3 * C), (0, C)):
        host = make_host(toy, pool, iter_calib=iter_calib)
        calls = []
        real_step = host.optimizer.step
        host.optimizer.step = lambda *a, **k: (calls.append(1), real_step(*a, **k))[1]
        metrics = host.step(0)
        assert len(calls) == steps
        assert ("loss_ce" in metrics) == (iter_calib > 0)


def test_synthetic_view_caps_the_decoded_images_at_batch_syn_max(toy, pool):
    host = make_host(toy, pool, batch_syn_max=3)
    full, _ = decode(host.syn.detach()[2:3], torch.tensor([2]), factor=2)
    a, la = host.synthetic_view(2, 0, 0, 0)
    a = a.detach()
    b, _ = host.synthetic_view(2, 0, 0, 0)
    assert a.shape[0] == 3 and la.tolist() == [2, 2, 2]
    assert torch.equal(a, b)                                 # seeded by (t, view, step, c)
    rows = [min(range(4), key=lambda i: float((full[i] - img).abs().sum())) for img in a]
    assert len(set(rows)) == 3                               # a subset, no repeats
    for i, img in zip(rows, a):
        assert torch.equal(full[i], img.detach())
    assert make_host(toy, pool).synthetic_view(2, 0, 0, 0)[0].shape[0] == 4
    draws = {tuple(host.synthetic_view(2, t, 0, 0)[0].flatten()[:4].tolist()) for t in range(8)}
    assert len(draws) > 1                                    # another t, another subset


def test_bad_settings_are_refused(toy, pool):
    with pytest.raises(ValueError, match=r"^DANCE: batch_syn_max must be >= 1, got 0$"):
        make_host(toy, pool, batch_syn_max=0)
    with pytest.raises(ValueError, match=r"^DANCE: iter_calib must be >= 0, got -1$"):
        make_host(toy, pool, iter_calib=-1)


# -- the adapter ------------------------------------------------------------------------------
def test_adapter_without_plugins_equals_the_bare_method(toy, pool):
    bare, grafted = make_host(toy, pool), make_host(toy, pool, DANCEHost, PluginSet())
    for t in range(T):
        a, b = bare.step(t), grafted.step(t)
        a.pop("seconds"), b.pop("seconds")
        assert a == b
    assert torch.equal(bare.syn, grafted.syn)
    grafted.close()


@pytest.mark.parametrize("subset", SUBSETS, ids=lambda s: ",".join(s) or "none")
def test_every_plugin_subset_runs_exactly_its_hooks(subset, toy, pool, hook_calls,
                                                    monkeypatch):
    calls = hook_calls
    middles = {"middle": 0}
    count_calls(monkeypatch, DANCE, "middle_model", middles, "middle")
    plugins = PluginSet.from_names(",".join(subset) or "none", experts=pool)
    host = make_host(toy, pool, DANCEHost, plugins, num_iterations=2)
    metrics = []
    host.run(callback=lambda t, m: metrics.append(m), progress=False)
    assert {n for n, k in calls.items() if k} == set(subset)
    expected = {"cap": 2 * C, "ptm": 2, "plm": 2 * C}       # per class / per iteration
    for name in subset:
        assert calls[name] == expected[name]
    assert middles["middle"] == (0 if "ptm" in subset else 2)   # ptm: never made
    for m in metrics:
        assert ("loss_plm" in m) == ("plm" in subset)
        assert ("loss_ce" in m) == ("plm" not in subset)
    assert host.plugins.context is None                     # torn down


@pytest.mark.parametrize("spec", ["ptm", "cap,ptm,plm"])
def test_ptm_replaces_the_middle_model_and_leaves_the_experts_bit_identical(spec, toy, pool):
    before = expert_states(pool)
    grafted = make_host(toy, pool, DANCEHost, PluginSet.from_names(spec, experts=pool))
    grafted.start()
    ptm_net = grafted.plugins.pm.get_plugin("ptm").network
    assert grafted.matching_extractor(0, lambda: pytest.fail("middle model built")) is ptm_net
    grafted.run(progress=False)
    for (i0, s0), e in zip(before, pool.experts):
        assert all(torch.equal(i0[k], e.init_state[k]) for k in i0)
        assert all(torch.equal(s0[k], e.trained_state[k]) for k in s0)
    assert not torch.equal(make_host(toy, pool).run(progress=False), grafted.syn.detach().clamp(0, 1))


def test_plm_replaces_the_inter_class_ce(toy, pool):
    grafted = make_host(toy, pool, DANCEHost, PluginSet.from_names("plm", experts=pool))
    grafted.start()
    images, labels = normalize(pixel_init(toy))[:2], torch.tensor([1, 1])
    losses = grafted.inter_class_losses(images, labels, 0)
    assert set(losses) == {"plm"}
    torch.testing.assert_close(losses["plm"],
                               grafted.plugins.auxiliary_loss(images, labels, 0))
    grafted.close()
    # inner-class step untouched: same first matching loss as the bare method
    bare = make_host(toy, pool)
    grafted = make_host(toy, pool, DANCEHost, PluginSet.from_names("plm", experts=pool))
    grafted.start()
    extractor_a = bare.matching_extractor(0, lambda: bare.middle_model(0))
    la, _, _ = bare.inner_class_loss(extractor_a, 0, 0)
    extractor_b = grafted.matching_extractor(0, lambda: grafted.middle_model(0))
    lb, _, _ = grafted.inner_class_loss(extractor_b, 0, 0)
    assert torch.equal(la, lb)
    with pytest.warns(HookNeverCalled, match="'plm'"):  # this half never ran the CE step
        grafted.close()


def test_cap_filters_the_inner_class_real_batch_only(toy, pool):
    bare = make_host(toy, pool)
    grafted = make_host(toy, pool, DANCEHost, PluginSet.from_names("cap"))
    grafted.start()
    net = bare.middle_model(0)
    for c in range(C):
        la, drawn_a, kept_a = bare.inner_class_loss(net, c, 0)
        lb, drawn_b, kept_b = grafted.inner_class_loss(net, c, 0)
        assert drawn_a == drawn_b == kept_a == 5 and kept_b < 5      # t = 0: s_min out
        assert not torch.equal(la, lb)
    images, labels = normalize(pixel_init(toy))[:2], torch.tensor([0, 0])
    assert torch.equal(bare.inter_class_losses(images, labels, 0)["ce"],
                       grafted.inter_class_losses(images, labels, 0)["ce"])
    grafted.close()
    assert make_host(toy, pool, DANCEHost, PluginSet.from_names("cap")).step(0)["real_kept"] < 1


# -- resume -----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["none", "cap,ptm,plm"])
def test_resume_from_the_state_dict_equals_an_uninterrupted_run(spec, toy, pool):
    def host():
        return make_host(toy, pool, DANCEHost, PluginSet.from_names(spec, experts=pool))
    straight, resumed = straight_and_resumed(host)
    assert torch.equal(straight.syn, resumed.syn)


# -- IDC's whole-strategy augmentation --------------------------------------------------------
def test_sequence_applies_color_then_crop_then_cutout_with_one_draw():
    x = torch.rand(4, 3, 8, 8)
    dsa = DSA("color_crop_cutout")
    out = dsa.sequence(x, torch.zeros(4, dtype=torch.long), torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    expected = x
    for op in ("color", "crop", "cutout"):                  # IDC's order
        params = {k: v.expand(4) for k, v in dsa.draw_params(op, 1, 8, 8, g).items()}
        expected = dsa.apply(op, expected, params)
    torch.testing.assert_close(out, expected)
    # two groups: each its own draw, identical within a group
    twins = torch.cat([x[:1], x[:1]]).repeat(2, 1, 1, 1)
    out = dsa.sequence(twins, torch.tensor([0, 0, 1, 1]), torch.Generator().manual_seed(1))
    assert torch.equal(out[0], out[1]) and torch.equal(out[2], out[3])
    assert not torch.equal(out[0], out[2])
    assert torch.equal(DSA("none").sequence(x, None, torch.Generator()), x)


def test_sequence_picks_one_geometric_op_per_group():
    dsa = DSA("crop_scale_rotate")
    x = torch.rand(2, 1, 8, 8)
    out = dsa.sequence(x, None, torch.Generator().manual_seed(2))
    ref = dsa.siamese(x, None, torch.Generator().manual_seed(2))
    torch.testing.assert_close(out, ref)                    # the single-op choice of DSA


# -- the command line -------------------------------------------------------------------------
TINY = ["--ipc", "1", "--iterations", "3", "--batch-real", "8", "--eval-runs", "1",
        "--eval-epochs", "2", "--num-experts", "2", "--expert-epochs", "1",
        "--checkpoint-every", "2", "--log-every", "1", "--no-progress", "--device", "cpu"]


@pytest.mark.parametrize("spec", ["none", "cap,ptm,plm"])
def test_cli_runs_on_digits_and_writes_the_run_directory(spec, tmp_path, capsys,
                                                          random_experts):
    out = tmp_path / "run"
    assert dance_cli.main(TINY + ["--plugins", spec, "--out", str(out)]) == 0
    assert {"config.json", "synthetic.pt", "grid.png", "metrics.jsonl", "results.json",
            "run.log", "checkpoint.pt"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    plugins = [] if spec == "none" else spec.split(",")
    assert config["method"] == "dance" and config["plugins"] == plugins
    assert (config["factor"], config["lr_img"], config["momentum"], config["batch_syn_max"],
            config["iter_calib"], config["eval_protocol"]) == (2, 0.01, 0.5, 200, 1, "dance")
    assert config["sources"]["lr_img"] == "method dance"
    assert config["sources"]["eval_protocol"] == "method dance"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1, 2]
    for r in records:
        assert ("loss_plm" in r) == ("plm" in plugins) and ("loss_ce" in r) != ("plm" in plugins)
    synset = load_synset(out / "synthetic.pt")
    assert synset.images.shape == (10, 1, 32, 32) and synset.meta["method"] == "dance"
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    torch.testing.assert_close(synset.images, checkpoint["host"]["syn"].clamp(0, 1))
    assert "evaluation convnet" in capsys.readouterr().out


def test_cli_eval_protocol_flag_still_wins(tmp_path, random_experts):
    out = tmp_path / "run"
    assert dance_cli.main(TINY + ["--eval-runs", "0", "--eval-protocol", "dm",
                                  "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["eval_protocol"] == "dm" and config["sources"]["eval_protocol"] == \
        "command line"


def test_cli_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, random_experts):
    args = TINY + ["--iterations", "4", "--eval-runs", "0"]
    assert dance_cli.main(args + ["--out", str(tmp_path / "straight")]) == 0
    with killed_at(DANCE, 3):
        assert dance_cli.main(args + ["--out", str(tmp_path / "cut")]) == 130
    assert dance_cli.main(["--resume", str(tmp_path / "cut"), "--no-progress",
                           "--device", "cpu"]) == 0
    a = load_synset(tmp_path / "straight" / "synthetic.pt").images
    b = load_synset(tmp_path / "cut" / "synthetic.pt").images
    assert torch.equal(a, b)
    assert "resumed at iteration 2 of 4" in (tmp_path / "cut" / "run.log").read_text()


def test_cli_one_line_error_for_a_bad_dance_setting(tmp_path, capsys, random_experts):
    assert dance_cli.main(TINY + ["--batch-syn-max", "0", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--batch-syn-max" in err and "\n" not in err


def test_image_lr_rule():
    class D:
        def __init__(self, name, size):
            self.name, self.image_size = name, size
    assert dance_cli.dance_image_lr(D("cifar10", 32), {"ipc": 10}) == pytest.approx(0.1)
    assert dance_cli.dance_image_lr(D("imagenette", 128), {"ipc": 10}) == pytest.approx(1.0)


def test_adds_losses_names_the_plugin_sets_that_replace_the_ce_step(pool):
    assert not PluginSet().adds_losses
    assert not PluginSet.from_names("cap,ptm", experts=pool).adds_losses
    assert PluginSet.from_names("plm", experts=pool).adds_losses
