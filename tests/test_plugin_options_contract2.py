"""Plugin options crossed with each other where the docstrings say they combine, each
combination against a hand computation of what the docstring promises.

* ``plm``: every combination of ``logits`` x ``target`` x ``sharpen`` x ``step`` x two ``tau``
  (the class docstring's table: "Two readings are selectable, option by option") against
  Eq. 7-9 written out with plain tensor arithmetic; which host offers each combination needs;
* ``cap``: ``alpha`` (which mode, from the IPC) crossed with ``end`` (how far the schedule
  goes) against Eq. 2-4 computed with Python floats;
* ``ptm`` + ``plm``: ``lam`` crossed with ``--plm-logits extractor`` (PLM's logits then come
  from PTM's interval network of Eq. 5), through the plugin set and through the DM host.
"""
import itertools
import math

import pytest
import torch

from dm_plugins import DistillContext, DMHost, PluginSet, PseudoLabelMatching
from dm_plugins.seeding import make_generator

C, T, SEED = 3, 10, 7
ALL_OFFERS = frozenset({"extractor", "real_batch", "separate_step"})


# -- hand computations -----------------------------------------------------------------------
def _softmax(x):
    e = torch.exp(x - x.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def _log_softmax(x):
    return x - torch.log(torch.exp(x - x.max(dim=1, keepdim=True).values).sum(
        dim=1, keepdim=True)) - x.max(dim=1, keepdim=True).values


def _net(tiny_factory, state):
    net = tiny_factory()
    net.load_state_dict(state)
    return net.eval()


def _row(expert, images, c, reduce, tau):
    """Eq. 7 (mean, or the public code's sum, of the correct softmax rows; one-hot when none is
    correct) then Eq. 8 (softmax of it over tau), one class."""
    with torch.no_grad():
        probs = _softmax(expert(images))
    correct = [p for p in probs if int(p.argmax()) == c]
    if not correct:
        row = torch.eye(C)[c]
    else:
        row = sum(correct) if reduce == "sum" else sum(correct) / len(correct)
    return torch.exp(row / tau) / torch.exp(row / tau).sum()


def pooled_targets(expert, toy, k, reduce, tau, max_per_class):
    """Pooled rows: ``max_per_class`` images of each class drawn without replacement, classes
    in order, from one generator of (seed, 0x9B, k)."""
    g = make_generator(SEED, 0x9B, k)
    rows = []
    for c in range(C):
        idx = [i for i, label in enumerate(toy.labels.tolist()) if label == c]
        perm = torch.randperm(len(idx), generator=g)[:max_per_class].tolist()
        rows.append(_row(expert, toy.images[[idx[j] for j in perm]], c, reduce, tau))
    return torch.stack(rows)


def batch_targets(expert, real, real_labels, reduce, tau):
    return torch.stack([_row(expert, real[real_labels == c], c, reduce, tau) for c in range(C)])


def eq9(logits, labels, targets):
    """Cross-entropy against the class's target row, averaged over each class's images, summed
    over the classes present."""
    logp = _log_softmax(logits)
    total = 0.0
    for c in sorted(set(labels.tolist())):
        rows = (labels == c).nonzero().flatten().tolist()
        total = total + sum(-(targets[c] * logp[i]).sum() for i in rows) / len(rows)
    return total


def _inputs(toy, tiny_factory):
    g = torch.Generator().manual_seed(11)
    syn = torch.randn(6, 1, 8, 8, generator=g)
    syn_labels = torch.tensor([0, 0, 1, 1, 2, 2])
    real = torch.cat([toy.sample(c, 5, make_generator(1, c)) for c in range(C)])
    real_labels = torch.arange(C).repeat_interleave(5)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        extractor = tiny_factory()
    return syn, syn_labels, real, real_labels, extractor


def _plm_loss(pool, toy, tiny_factory, t, **options):
    plugins = PluginSet.from_names("plm", experts=pool, options={"plm": options})
    plugins.setup(DistillContext(num_classes=C, ipc=2, num_iterations=T, real=toy, seed=SEED,
                                 offers=ALL_OFFERS, extra={"method": "test host"}))
    syn, syn_labels, real, real_labels, extractor = _inputs(toy, tiny_factory)
    loss = plugins.auxiliary_losses(syn, syn_labels, t, extractor=extractor, real_images=real,
                                    real_labels=real_labels)["plm"]
    return plugins, loss


# -- plm: every option crossed with every other ----------------------------------------------
PLM_COMBOS = list(itertools.product(("expert", "extractor"), ("pooled", "batch"),
                                    ("mean", "sum"), ("joint", "separate"), (0.3, 4.0)))


@pytest.mark.parametrize("logits,target,sharpen,step,tau", PLM_COMBOS,
                         ids=["-".join(map(str, c)) for c in PLM_COMBOS])
def test_plm_each_combination_is_eq_7_to_9_with_its_readings(logits, target, sharpen, step, tau,
                                                             pool, toy, tiny_factory):
    # catches: any option read from the wrong attribute or ignored in one branch (e.g. the batch
    # target always using reduce="sum", or the pooled rows sharpened with the default tau)
    t = 3
    plugins, loss = _plm_loss(pool, toy, tiny_factory, t, logits=logits, target=target,
                              sharpen=sharpen, step=step, tau=tau, lr=0.02,
                              max_real_per_class=4)
    syn, syn_labels, real, real_labels, extractor = _inputs(toy, tiny_factory)
    k = pool.pick(t)
    expert = _net(tiny_factory, pool.experts[k].trained_state)
    targets = (pooled_targets(expert, toy, k, sharpen, tau, 4) if target == "pooled"
               else batch_targets(expert, real, real_labels, sharpen, tau))
    network = expert if logits == "expert" else extractor
    hand = eq9(network(syn), syn_labels, targets)
    torch.testing.assert_close(loss, hand, rtol=1e-5, atol=1e-6)
    # the step option only says where the loss goes: its rate, and what the host must offer
    assert plugins.separate_step_lr == (0.02 if step == "separate" else None)
    needs = {n for n, on in (("extractor", logits == "extractor"),
                             ("real_batch", target == "batch"),
                             ("separate_step", step == "separate")) if on}
    plm, = plugins.plugins()
    assert plm.host_needs == frozenset(needs)
    assert all(plugins.needs(n) == (n in needs) for n in ALL_OFFERS)


def test_plm_every_reading_of_the_loss_gives_its_own_number(pool, toy, tiny_factory):
    # catches: an option that silently falls back to the default in some combination (two
    # combinations would then give the same loss); taus large enough that no target is one-hot
    # and whose ratio is no class size (mean / tau = sum / (n tau))
    losses = {}
    for logits, target, sharpen, tau in itertools.product(("expert", "extractor"),
                                                          ("pooled", "batch"),
                                                          ("mean", "sum"), (2.0, 7.0)):
        _, loss = _plm_loss(pool, toy, tiny_factory, 3, logits=logits, target=target,
                            sharpen=sharpen, tau=tau, max_real_per_class=4)
        losses[(logits, target, sharpen, tau)] = float(loss.detach())
    for (a, la), (b, lb) in itertools.combinations(losses.items(), 2):
        assert abs(la - lb) > 1e-6 * max(1.0, abs(la)), (a, b, la)


@pytest.mark.parametrize("sharpen", ["mean", "sum"])
def test_plm_a_class_the_expert_gets_all_wrong_falls_back_to_its_one_hot_in_both_targets(
        sharpen, pool, toy, tiny_factory):
    # catches: the fallback dropped from the sum reduction (a zero row, softmax uniform) or
    # from the batch targets
    from dm_plugins.pseudo_label import batch_pseudo_labels, compute_pseudo_labels

    class Always0(torch.nn.Module):         # predicts class 0 for everything
        def forward(self, x):
            return torch.tensor([[2.0, 0.5, 0.0]]).repeat(x.shape[0], 1)
    net, tau = Always0(), 0.7
    real = torch.cat([toy.sample(c, 3, make_generator(2, c)) for c in range(C)])
    labels = torch.arange(C).repeat_interleave(3)
    probs = _softmax(torch.tensor([2.0, 0.5, 0.0]))
    row0 = probs * (3 if sharpen == "sum" else 1)
    expected = torch.stack([_softmax(row0 / tau), _softmax(torch.eye(C)[1] / tau),
                            _softmax(torch.eye(C)[2] / tau)])
    torch.testing.assert_close(batch_pseudo_labels(net, real, labels, C, tau, sharpen), expected)
    from dm_plugins import ClassIndexedTensors
    pooled = compute_pseudo_labels(net, ClassIndexedTensors(real, labels), C, tau, 3,
                                   torch.Generator().manual_seed(0), reduce=sharpen)
    torch.testing.assert_close(pooled, expected)


def test_plm_needs_crossed_with_what_each_host_offers(pool):
    # catches: refusal naming a need the host does offer, or returning None while one is missing
    flags = {"extractor": "--plm-logits extractor", "real_batch": "--plm-target batch",
             "separate_step": "--plm-step separate"}
    for logits, target, step in itertools.product(("expert", "extractor"), ("pooled", "batch"),
                                                  ("joint", "separate")):
        options = {"logits": logits, "target": target, "step": step}
        needs = PseudoLabelMatching.needs_for(options)
        assert needs == PseudoLabelMatching(pool, **options).host_needs
        for r in range(4):
            for offers in itertools.combinations(sorted(ALL_OFFERS), r):
                problem = PseudoLabelMatching.refusal(needs, frozenset(offers), "host X")
                missing = sorted(needs - set(offers))
                if not missing:
                    assert problem is None
                else:
                    assert problem.startswith(f"{flags[missing[0]]} needs a host that offers "
                                              f"{missing[0]!r}") and "host X" in problem


# -- cap: alpha crossed with end -------------------------------------------------------------
# unit vectors at these angles from z_syn = e0: cosines 1, 0.9, 0.7, 0.4, 0.1, -0.2
COSINES = [1.0, 0.9, 0.7, 0.4, 0.1, -0.2]
REAL = torch.tensor([[c, math.sqrt(max(0.0, 1 - c * c))] for c in COSINES])
SYN = torch.tensor([[3.0, 0.0], [1.0, 0.0]])


def hand_cap_mask(ipc, alpha, end, t):
    """Eq. 2-4 with floats: typical below alpha, diverse at or above it; p = end * t / T; the
    best-scored samples when the rule keeps none."""
    p = end * t / T
    s_min, s_max, s_mean = min(COSINES), max(COSINES), sum(COSINES) / len(COSINES)
    if ipc < alpha:
        keep = [s > s_min + p * (s_mean - s_min) for s in COSINES]
        best = [s >= s_max - 1e-6 for s in COSINES]
    else:
        keep = [s <= s_max - p * (s_max - s_mean) for s in COSINES]
        best = [s <= s_min + 1e-6 for s in COSINES]
    return keep if any(keep) else best


CAP_COMBOS = list(itertools.product([(5, 4), (5, 5), (5, 6), (1, 1), (200, 50)],
                                    (1.0, 0.5, 0.25), (0, 5, 9)))


@pytest.mark.parametrize("alpha_ipc,end,t", CAP_COMBOS,
                         ids=[f"a{a}-ipc{i}-end{e}-t{t}" for (a, i), e, t in CAP_COMBOS])
def test_cap_alpha_and_end_together_are_eq_2_to_4(alpha_ipc, end, t):
    # catches: end applied in one mode only, the mode boundary at ipc > alpha, or alpha/end
    # swapped when routed through options={"cap": ...}
    alpha, ipc = alpha_ipc
    plugins = PluginSet.from_names("cap", options={"cap": {"alpha": alpha, "end": end}})
    plugins.setup(num_classes=1, ipc=ipc, num_iterations=T)
    cap, = plugins.plugins()
    assert (cap.alpha, cap.end, cap.mode) == (alpha, end,
                                              "typical" if ipc < alpha else "diverse")
    mask = plugins.keep_mask(0, REAL, SYN, t)
    assert mask.tolist() == hand_cap_mask(ipc, alpha, end, t)


def test_cap_end_changes_the_mask_in_both_modes():
    # catches: end ignored in one of the two rules (every other combination could still agree)
    for alpha, ipc in ((5, 4), (5, 5)):
        masks = {end: hand_cap_mask(ipc, alpha, end, 9) for end in (1.0, 0.5)}
        assert masks[1.0] != masks[0.5]
        for end, expected in masks.items():
            plugins = PluginSet.from_names("cap", options={"cap": {"alpha": alpha, "end": end}})
            plugins.setup(num_classes=1, ipc=ipc, num_iterations=T)
            assert plugins.keep_mask(0, REAL, SYN, 9).tolist() == expected


# -- ptm's lam crossed with plm's extractor logits -------------------------------------------
def _interval(tiny_factory, expert, r):
    return _net(tiny_factory, {n: r * expert.trained_state[n] + (1 - r) * expert.init_state[n]
                               for n in expert.init_state})


@pytest.mark.parametrize("lam,t", [(1.0, 7), (2.0, 7), (10.0, 9), (2.0, 0)])
def test_plm_extractor_logits_come_from_ptms_interval_network_at_its_lambda(lam, t, pool, toy,
                                                                            tiny_factory):
    # catches: ptm's lam not reaching the network plm's extractor reading uses (r = t/T instead
    # of (t/lam)/T), or plm using the trained expert although logits=extractor
    plugins = PluginSet.from_names("ptm,plm", experts=pool, options={
        "ptm": {"lam": lam}, "plm": {"logits": "extractor", "tau": 0.5}})
    plugins.setup(DistillContext(num_classes=C, ipc=2, num_iterations=T, real=toy, seed=SEED,
                                 offers=frozenset({"extractor"})))
    syn, syn_labels, *_ = _inputs(toy, tiny_factory)
    net = plugins.extractor(t)
    loss = plugins.auxiliary_losses(syn, syn_labels, t, extractor=net)["plm"]
    k = pool.pick(t)
    expert = pool.experts[k]
    interval = _interval(tiny_factory, expert, (t / lam) / T)
    targets = pooled_targets(_net(tiny_factory, expert.trained_state), toy, k, "mean", 0.5, 500)
    torch.testing.assert_close(loss, eq9(interval(syn), syn_labels, targets), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("lam", [1.0, 4.0])
def test_dm_host_gives_plm_ptms_network_as_its_extractor(lam, pool, toy, tiny_factory):
    # catches: the DM host passing its own random network (or none) as plm's extractor when
    # ptm provides one, or the logged loss_plm not being that loss
    t = 6
    g = torch.Generator().manual_seed(4)
    syn0 = torch.cat([toy.sample(c, 2, g) for c in range(C)])
    plugins = PluginSet.from_names("ptm,plm", experts=pool, options={
        "ptm": {"lam": lam}, "plm": {"logits": "extractor", "tau": 0.5}})
    host = DMHost(toy, tiny_factory, syn0, num_iterations=T, plugins=plugins, batch_real=5,
                  seed=SEED)
    metrics = host.step(t)
    k = pool.pick(t)
    expert = pool.experts[k]
    interval = _interval(tiny_factory, expert, (t / lam) / T)
    targets = pooled_targets(_net(tiny_factory, expert.trained_state), toy, k, "mean", 0.5, 500)
    labels = torch.arange(C).repeat_interleave(2)
    with torch.no_grad():
        hand = float(eq9(interval(syn0), labels, targets))
    assert metrics["loss_plm"] == pytest.approx(hand, rel=1e-5)
    host.close()
