"""The public PTLM code's reading as options of the three plugins and of the DANCE host: each
option against a hand computation, the whole reading on DANCE against a hand-written iteration,
refusals by hosts that do not offer what an option needs, options that belong to their plugin,
and ``baselines/dance.py --preset ptlm-code`` on the embedded digits."""
import json
import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from adapters.dance import DANCEHost
from baselines import dance as dance_cli
from baselines import dm as dm_cli
from baselines.harness.factorization import decode
from baselines.harness.plugin_flags import plugin_options
from baselines.methods import dance as dance_module
from dm_plugins import (CapacityMatching, DistillContext, PluginError, PluginSet,
                        PseudoLabelMatching, capacity_keep_mask)
from dm_plugins.capacity import capacity_progress
from dm_plugins.options import PluginOption
from dm_plugins.pseudo_label import batch_pseudo_labels, class_prediction
from dm_plugins.seeding import make_generator
from tests.conftest import straight_and_resumed
from tests.test_dance import C, TINY, T, make_host, normalize, pixel_init

CODE = {"cap": {"end": 0.5, "alpha": 200}, "ptm": {"lam": 2.0},
        "plm": {"logits": "extractor", "target": "batch", "sharpen": "sum", "tau": 0.01,
                "step": "separate", "lr": 0.01}}


# -- cap: the schedule's end ------------------------------------------------------------------
def test_cap_progress_ends_at_its_end():
    assert capacity_progress(0, 10) == 0 and capacity_progress(5, 10) == 0.5
    assert capacity_progress(9, 10, end=0.5) == 0.45
    # the public code: (t // 2) / 10000 at T = 10,000 is within 1 / (2T) of end = 0.5
    for t in (0, 1, 2, 4999, 9999):
        assert abs(capacity_progress(t, 10000, 0.5) - (t // 2) / 10000) <= 1 / 20000


def test_cap_end_moves_the_threshold_as_a_hand_computation():
    # unit-length real features against z_syn = e0: cosines 1, 0.8, 0.28, 0; mean 0.52, min 0
    real = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.28, 0.96], [0.0, 1.0]])
    syn = torch.tensor([[2.0, 0.0]])
    # t/T = 0.9. end 1: p 0.9, threshold 0.9 * 0.52 = 0.468 keeps 1 and 0.8;
    # end 0.5: p 0.45, threshold 0.234 keeps 0.28 as well
    assert capacity_keep_mask(real, syn, 9, 10, "typical").tolist() == [True, True, False, False]
    assert capacity_keep_mask(real, syn, 9, 10, "typical", end=0.5).tolist() == \
        [True, True, True, False]


def test_cap_alpha_200_keeps_ipc_50_typical():
    assert CapacityMatching(ipc=50).mode == "diverse"
    assert CapacityMatching(ipc=50, alpha=200).mode == "typical"
    assert CapacityMatching(ipc=200, alpha=200).mode == "diverse"
    with pytest.raises(ValueError, match="end"):
        CapacityMatching(end=0.0)


# -- plm: sharpening, batch targets, logits network --------------------------------------------
def test_class_prediction_sum_is_the_sum_of_correct_rows():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.5, 0.3, 0.2]])
    torch.testing.assert_close(class_prediction(probs, 0, "sum"), torch.tensor([1.2, 0.5, 0.3]))
    torch.testing.assert_close(class_prediction(probs, 0, "mean"), torch.tensor([0.6, 0.25, 0.15]))
    assert class_prediction(probs, 2, "sum").tolist() == [0.0, 0.0, 1.0]  # none correct


def test_batch_pseudo_labels_follow_the_public_code(pool, toy):
    """softmax(sum of the expert's softmax over the correctly classified real images / 0.01),
    written out for each class of a mixed batch."""
    expert = pool.trained_network(0)
    images = torch.cat([toy.sample(c, 6, make_generator(1, c)) for c in range(C)])
    labels = torch.arange(C).repeat_interleave(6)
    rows = batch_pseudo_labels(expert, images, labels, C, tau=0.01, reduce="sum")
    with torch.no_grad():
        probs = F.softmax(expert(images), dim=1)
    for c in range(C):
        mine = probs[labels == c]
        correct = mine[mine.argmax(1) == c]
        assert len(correct) > 0
        torch.testing.assert_close(rows[c], F.softmax(correct.sum(0) / 0.01, dim=0))


def _context(toy, offers=("extractor", "real_batch", "separate_step")):
    return DistillContext(num_classes=C, ipc=1, num_iterations=T, real=toy,
                          offers=frozenset(offers), extra={"method": "test host"})


def test_plm_through_the_extractor_against_the_batch_is_a_hand_cross_entropy(pool, toy,
                                                                                tiny_factory):
    plm = PseudoLabelMatching(pool, **CODE["plm"])
    plugins = PluginSet([plm])
    plugins.setup(_context(toy))
    extractor = tiny_factory()
    syn = torch.randn(4, 1, 8, 8, requires_grad=True)
    syn_labels = torch.tensor([1, 1, 1, 1])
    real = toy.sample(1, 5, make_generator(2))
    real_labels = torch.full((5,), 1)
    loss = plugins.auxiliary_losses(syn, syn_labels, 1, extractor=extractor, real_images=real,
                                    real_labels=real_labels)["plm"]
    expert = pool.trained_network(pool.pick(1))
    with torch.no_grad():
        probs = F.softmax(expert(real), dim=1)
    target = F.softmax(probs[probs.argmax(1) == 1].sum(0) / 0.01, dim=0)
    hand = -(target * F.log_softmax(extractor(syn), dim=1)).sum(1).mean()
    torch.testing.assert_close(loss, hand)
    assert plugins.separate_step_lr == 0.01 and plugins.needs("real_batch")
    loss.backward()
    assert syn.grad is not None and all(p.grad is None for p in expert.parameters())


@pytest.mark.parametrize("option,value,offer", [("logits", "extractor", "extractor"),
                                                 ("target", "batch", "real_batch"),
                                                 ("step", "separate", "separate_step")])
def test_a_host_that_does_not_offer_it_refuses_the_option_in_one_line(option, value, offer,
                                                                       pool, toy):
    offers = {"extractor", "real_batch", "separate_step"} - {offer}
    plugins = PluginSet([PseudoLabelMatching(pool, **{option: value})])
    with pytest.raises(PluginError) as info:
        plugins.setup(_context(toy, offers))
    message = str(info.value)
    assert "\n" not in message and f"--plm-{option} {value}" in message and "test host" in message
    PluginSet([PseudoLabelMatching(pool, **{option: value})]).setup(_context(toy, offers | {offer}))


def test_dm_command_line_refuses_the_batch_target_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    assert dm_cli.main(["--plugins", "plm", "--plm-target", "batch", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --plm-target batch") and "\n" not in err
    assert not out.exists()


# -- options belong to their plugin -----------------------------------------------------------
class ThirdParty:
    """A third-party plugin with an option that shares cap's name."""
    name = "third"
    options = (PluginOption("alpha", float, 0.25, "its own alpha"),)

    def __init__(self, alpha=0.25):
        self.alpha = alpha


def test_a_plugin_receives_only_its_own_options(monkeypatch):
    from dm_plugins import manager
    real = manager.available_plugins
    monkeypatch.setattr(manager, "available_plugins", lambda: {**real(), "third": ThirdParty})
    plugins = PluginSet.from_names("cap,third", options={"cap": {"alpha": 7, "end": 0.5}})
    cap, third = plugins.plugins()
    assert (cap.alpha, cap.end, third.alpha) == (7, 0.5, 0.25)
    with pytest.raises(PluginError, match="no option 'bogus'"):
        PluginSet.from_names("cap", options={"cap": {"bogus": 1}})
    with pytest.raises(PluginError, match="--cap-end must be in"):
        PluginSet.from_names("cap", options={"cap": {"end": 2.0}})
    with pytest.raises(PluginError, match="not among"):
        PluginSet.from_names("cap", options={"plm": {"tau": 1.0}})


def test_the_old_flat_keywords_still_work_with_a_warning(pool):
    with pytest.warns(DeprecationWarning, match="options="):
        plugins = PluginSet.from_names("cap,ptm", experts=pool, alpha=7, lam=3)
    cap, ptm = plugins.plugins()
    assert cap.alpha == 7 and ptm.lam == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # resources are not deprecated
        PluginSet.from_names("ptm", experts=pool)


def test_plugin_options_read_old_configs_too():
    assert plugin_options({"plugins": ["cap", "ptm"], "alpha": 7, "lam": 2.0, "tau": 0.5}) == \
        {"cap": {"alpha": 7}, "ptm": {"lam": 2.0}}
    assert plugin_options({"plugins": ["cap"], "alpha": 7, "cap_alpha": 9, "cap_end": 0.5}) == \
        {"cap": {"alpha": 9, "end": 0.5}}


# -- the whole reading on the DANCE host ------------------------------------------------------
def code_reading(pool):
    return PluginSet.from_names("cap,ptm,plm", options=CODE, experts=pool)


def test_two_iterations_equal_a_hand_written_public_code_iteration(toy, pool, tiny_factory):
    """Independent reimplementation of the public code's loop: clamp; interval model
    l * theta_init + (1 - l) * theta_star with l = (T - t/2) / T; per class the typical-rule
    filter at progress t / (2T) and a matching step (lr, momentum m); then per class a new real
    batch, the trained expert's summed correct softmax / 0.01 as the target, CE of the interval
    model's logits on the synthetic images, a step of a second SGD (lr 0.01, momentum m)."""
    lr, m = 0.05, 0.5
    host = make_host(toy, pool, DANCEHost, code_reading(pool), augment=None, lr=lr, momentum=m)
    x = pixel_init(toy)
    bufs = [None, None]

    def sgd(x, grad, which, rate):
        bufs[which] = grad.clone() if bufs[which] is None else m * bufs[which] + grad
        return x - rate * bufs[which]

    for t in range(2):
        x = x.clamp(0, 1)
        e = pool.experts[pool.pick(t)]
        l = (T - t / 2) / T
        interval = tiny_factory()
        interval.load_state_dict({n: l * e.init_state[n] + (1 - l) * e.trained_state[n]
                                  for n in e.init_state})
        final = tiny_factory()
        final.load_state_dict(e.trained_state)
        for c in range(C):
            real = toy.sample(c, 5, make_generator(0, dance_module._REAL_STREAM, t, c))
            leaf = x.clone().requires_grad_(True)
            syn, _ = decode(leaf[c:c + 1], torch.tensor([c]), factor=2)
            target = interval.embed(real).detach()
            feat = interval.embed(normalize(syn))
            s = F.normalize(target, dim=1) @ F.normalize(feat.mean(0), dim=0)
            keep = s > s.min() + (t / (2 * T)) * (s.mean() - s.min())
            ((feat.mean(0) - target[keep].mean(0)) ** 2).sum().backward()
            x = sgd(x, leaf.grad, 0, lr)
        for c in range(C):
            real = toy.sample(c, 5, make_generator(0, dance_module._INTER_REAL_STREAM, t, 0, c))
            leaf = x.clone().requires_grad_(True)
            syn, _ = decode(leaf[c:c + 1], torch.tensor([c]), factor=2)
            with torch.no_grad():
                probs = final(real).softmax(1)
            correct = probs.argmax(1) == c
            assert bool(correct.any())
            label = (probs[correct].sum(0) / 0.01).softmax(0)
            logits = interval(normalize(syn))
            (-(label * F.log_softmax(logits, dim=1)).sum(1).mean()).backward()
            x = sgd(x, leaf.grad, 1, 0.01)
        metrics = host.step(t)
        torch.testing.assert_close(host.syn.detach(), x, rtol=1e-5, atol=1e-6)
        assert "loss_plm" in metrics and "loss_ce" not in metrics
    host.close()


def test_the_code_reading_resumes_exactly_with_its_second_optimiser(toy, pool):
    straight, resumed = straight_and_resumed(
        lambda: make_host(toy, pool, DANCEHost, code_reading(pool)))
    assert torch.equal(straight.syn, resumed.syn)
    state = straight.state_dict()
    assert state["inter_optimizer"]["param_groups"][0]["lr"] == 0.01
    plain = make_host(toy, pool, DANCEHost, PluginSet.from_names("plm", experts=pool))
    with pytest.raises(ValueError, match="optimiser"):
        plain.load_state_dict(state)


def test_without_plugins_the_host_makes_no_second_optimiser(toy, pool):
    host = make_host(toy, pool, DANCEHost, PluginSet())
    host.step(0)
    assert host.inter_optimizer is host.optimizer and "inter_optimizer" not in host.state_dict()


# -- the preset on the command line ----------------------------------------------------------
def test_preset_ptlm_code_runs_on_digits_and_records_the_five_settings(tmp_path,
                                                                        random_experts):
    out = tmp_path / "run"
    assert dance_cli.main(TINY + ["--preset", "ptlm-code", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    expected = {"cap_end": 0.5, "cap_alpha": 200, "ptm_lam": 2.0, "plm_logits": "extractor",
                "plm_target": "batch", "plm_sharpen": "sum", "plm_tau": 0.01,
                "plm_step": "separate", "plm_lr": 0.01, "eval_protocol": "dance"}
    assert {k: config[k] for k in expected} == expected
    assert all(config["sources"][k] == "preset ptlm-code" for k in expected)
    assert config["plugins"] == ["cap", "ptm", "plm"] and config["method"] == "dance"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_plm" in r for r in records)


def test_a_plugin_flag_wins_over_the_preset_and_resume_keeps_it(tmp_path, random_experts):
    out = tmp_path / "run"
    args = TINY + ["--preset", "ptlm-code", "--cap-end", "1", "--eval-runs", "0"]
    assert dance_cli.main(args + ["--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["cap_end"] == 1.0 and config["sources"]["cap_end"] == "command line"
    assert dance_cli.main(["--resume", str(out), "--cap-end", "0.5"]) == 2


def test_the_old_alpha_flag_is_an_alias(tmp_path, random_experts):
    out = tmp_path / "run"
    assert dance_cli.main(TINY + ["--plugins", "cap", "--alpha", "3", "--eval-runs", "0",
                                  "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["cap_alpha"] == 3
