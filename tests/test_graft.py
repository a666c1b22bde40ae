"""Grafting the plugins into a foreign, per-class DM loop of the original code's shape.

``bare_loop`` is written the way the widely used DM code writes its loop (our own code): the
global RNG seeded once, a fresh network per iteration, per class a random real batch from the
global RNG, one augmentation seed drawn per class and applied to the real and the synthetic
images in two calls, a per-class loss, one SGD step. ``grafted_loop`` is the same loop plus the
glue lines a user adds (marked ``# glue``). Without plugins the two are bit-identical; with each
plugin the result equals the bare loop with that plugin's effect written out by hand.
"""
import re
import warnings
from pathlib import Path

import pytest
import torch

from dm_plugins import ExpertPool, PluginSet
from dm_plugins.capacity import capacity_keep_mask
from dm_plugins.manager import HookNeverCalled
from dm_plugins.pseudo_label import pseudo_label_loss, sharpen
from tests.conftest import TinyNet

ROOT = Path(__file__).resolve().parents[1]
C, IPC, T, BATCH = 3, 2, 4, 5


def augment(x, seed):
    """A per-class augmentation seeded like the original code's DSA (one seed per class)."""
    g = torch.Generator().manual_seed(seed)
    return x * (0.5 + torch.rand((), generator=g)) + 0.1 * torch.randn((), generator=g)


def reseeding_factory():
    """Research factories often reseed the global RNG themselves (from the wall clock in the
    original code); a fixed reseed is the worst case: every call builds identical weights."""
    torch.manual_seed(1234)
    return TinyNet()


def _syn_init(real):
    g = torch.Generator().manual_seed(7)
    return torch.cat([real.sample(c, IPC, g) for c in range(C)])


def bare_loop(real, *, net_for=None, filter_real=None, extra_loss=None):
    """The original shape. The keyword hooks write a plugin's effect out by hand (tests only)."""
    torch.manual_seed(0)
    syn = _syn_init(real).requires_grad_(True)
    opt = torch.optim.SGD([syn], lr=0.5, momentum=0.5)
    losses = []
    for it in range(T):
        net = TinyNet() if net_for is None else net_for(it)
        net.train()
        for p in net.parameters():
            p.requires_grad = False
        loss = torch.tensor(0.0)
        for c in range(C):
            idx = torch.randperm(real.class_size(c))[:BATCH]
            img_real = real.images_of(c)[idx]
            img_syn = syn[c * IPC:(c + 1) * IPC]
            seed = int(torch.randint(0, 100000, ()))
            img_real, img_syn = augment(img_real, seed), augment(img_syn, seed)
            out_real = net.embed(img_real).detach()
            out_syn = net.embed(img_syn)
            if filter_real is not None:
                out_real = filter_real(c, out_real, out_syn, it)
            loss = loss + ((out_real.mean(0) - out_syn.mean(0)) ** 2).sum()
            if extra_loss is not None:
                loss = loss + extra_loss(img_syn, c, it)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
    return syn.detach(), torch.stack(losses)


def grafted_loop(real, spec, experts_dir, factory=TinyNet, **options):
    """The original shape plus the glue (7 lines, experts included)."""
    torch.manual_seed(0)
    experts = ExpertPool.load_or_train(experts_dir, factory, real.images, real.labels,   # glue
                                       num_experts=2, epochs=3, batch_size=12, lr=0.05,
                                       progress=False)
    plugins = PluginSet.from_names(spec, experts=experts, **options)                    # glue
    plugins.setup(num_classes=C, ipc=IPC, num_iterations=T, real=real)                   # glue
    syn = _syn_init(real).requires_grad_(True)
    opt = torch.optim.SGD([syn], lr=0.5, momentum=0.5)
    losses = []
    for it in range(T):
        net = plugins.extractor(it, fallback=TinyNet)                                    # glue
        net.train()
        for p in net.parameters():
            p.requires_grad = False
        loss = torch.tensor(0.0)
        for c in range(C):
            idx = torch.randperm(real.class_size(c))[:BATCH]
            img_real = real.images_of(c)[idx]
            img_syn = syn[c * IPC:(c + 1) * IPC]
            seed = int(torch.randint(0, 100000, ()))
            img_real, img_syn = augment(img_real, seed), augment(img_syn, seed)
            out_real = net.embed(img_real).detach()
            out_syn = net.embed(img_syn)
            out_real = plugins.select_real(c, out_real, out_syn, it)                     # glue
            loss = loss + ((out_real.mean(0) - out_syn.mean(0)) ** 2).sum()
            loss = loss + plugins.auxiliary_loss(img_syn, torch.full((IPC,), c), it)     # glue
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
    plugins.teardown()                                                                   # glue
    return syn.detach(), torch.stack(losses), experts, plugins


@pytest.fixture(scope="module")
def experts_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("graft-experts")


def test_no_plugins_is_bit_identical_to_the_bare_loop(toy, experts_dir):
    syn, losses = bare_loop(toy)
    g_syn, g_losses, _, _ = grafted_loop(toy, "none", experts_dir)
    assert torch.equal(losses, g_losses)
    assert torch.equal(syn, g_syn)


def test_a_factory_that_reseeds_leaves_experts_distinct_and_the_loop_untouched(toy, tmp_path):
    syn, losses = bare_loop(toy)
    g_syn, g_losses, experts, _ = grafted_loop(toy, "none", tmp_path / "e",
                                               factory=reseeding_factory)
    assert torch.equal(syn, g_syn) and torch.equal(losses, g_losses)
    a, b = experts.experts
    assert not torch.equal(a.init_state["features.0.weight"], b.init_state["features.0.weight"])


def test_cap_filters_exactly_eq4(toy, experts_dir):
    def by_hand(c, out_real, out_syn, it):
        return out_real[capacity_keep_mask(out_real, out_syn, it, T, "typical")]
    syn, losses = bare_loop(toy, filter_real=by_hand)
    g_syn, g_losses, _, _ = grafted_loop(toy, "cap", experts_dir)
    torch.testing.assert_close(g_losses, losses)
    torch.testing.assert_close(g_syn, syn)
    assert not torch.equal(losses, bare_loop(toy)[1])      # the filter did change something


def test_ptm_supplies_exactly_eq5(toy, experts_dir):
    _, _, experts, _ = grafted_loop(toy, "none", experts_dir)

    def by_hand(it):
        e = experts.experts[experts.pick(it)]
        r = it / T
        with torch.random.fork_rng(devices=[]):     # ptm builds no network inside the loop
            net = TinyNet()
        net.load_state_dict({n: r * e.trained_state[n] + (1 - r) * e.init_state[n]
                             for n in e.init_state})
        return net
    syn, losses = bare_loop(toy, net_for=by_hand)
    g_syn, g_losses, _, _ = grafted_loop(toy, "ptm", experts_dir)
    torch.testing.assert_close(g_losses, losses)
    torch.testing.assert_close(g_syn, syn)


def plm_targets_by_hand(experts, real, num_classes=C, tau=0.1):
    """Eq. 7-8 written out: per expert, each class's mean softmax over its correctly classified
    real images (all of them: max_real_per_class covers every image, so no sampling order
    matters), sharpened."""
    targets = []
    for k in range(len(experts)):
        net = experts.trained_network(k)
        rows = []
        for c in range(num_classes):
            p = torch.softmax(net(real.images_of(c)), dim=1)
            rows.append(p[p.argmax(1) == c].mean(0))
        targets.append(sharpen(torch.stack(rows), tau))
    return targets


def test_plm_adds_exactly_eq9(toy, experts_dir):
    _, _, experts, _ = grafted_loop(toy, "none", experts_dir)
    targets = plm_targets_by_hand(experts, toy)

    def by_hand(img_syn, c, it):
        k = experts.pick(it)
        return pseudo_label_loss(experts.trained_network(k)(img_syn),
                                 torch.full((IPC,), c), targets[k])
    syn, losses = bare_loop(toy, extra_loss=by_hand)
    g_syn, g_losses, _, plugins = grafted_loop(toy, "plm", experts_dir,
                                               options={"plm": {"max_real_per_class": 100}})
    torch.testing.assert_close(g_losses, losses)
    torch.testing.assert_close(g_syn, syn)


def test_per_class_auxiliary_calls_add_up_to_one_batched_call(toy, pool):
    plugins = PluginSet.from_names("plm", experts=pool)
    plugins.setup(num_classes=C, ipc=IPC, num_iterations=T, real=toy)
    syn = torch.randn(C * IPC, 1, 8, 8)
    labels = torch.arange(C).repeat_interleave(IPC)
    batched = plugins.auxiliary_loss(syn, labels, 2)
    per_class = sum(plugins.auxiliary_loss(syn[labels == c], labels[labels == c], 2)
                    for c in range(C))
    torch.testing.assert_close(batched, per_class)


def branching_loop(real, spec, experts, *, batched):
    """The original code's two branches (per class for ConvNet, one forward for every class for
    ConvNetBN) with only the README's per-class glue added: the batched branch reaches the shared
    extractor line and nothing else."""
    torch.manual_seed(0)
    plugins = PluginSet.from_names(spec, experts=experts)
    plugins.setup(num_classes=C, ipc=IPC, num_iterations=T, real=real)
    syn = _syn_init(real).requires_grad_(True)
    opt = torch.optim.SGD([syn], lr=0.5, momentum=0.5)
    for it in range(T):
        net = plugins.extractor(it, fallback=TinyNet)                                    # glue
        net.train()
        for p in net.parameters():
            p.requires_grad = False
        reals = [real.images_of(c)[torch.randperm(real.class_size(c))[:BATCH]] for c in range(C)]
        if not batched:
            loss = torch.tensor(0.0)
            for c in range(C):
                out_real = net.embed(reals[c]).detach()
                out_syn = net.embed(syn[c * IPC:(c + 1) * IPC])
                out_real = plugins.select_real(c, out_real, out_syn, it)                 # glue
                loss = loss + ((out_real.mean(0) - out_syn.mean(0)) ** 2).sum()
                loss = loss + plugins.auxiliary_loss(syn[c * IPC:(c + 1) * IPC],         # glue
                                                     torch.full((IPC,), c), it)
        else:
            out_real = net.embed(torch.cat(reals)).detach()
            out_syn = net.embed(syn)
            loss = torch.sum((out_real.reshape(C, BATCH, -1).mean(1)
                              - out_syn.reshape(C, IPC, -1).mean(1)) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    plugins.teardown()                                                                   # glue
    return syn.detach()


def test_the_per_class_glue_in_the_batched_branch_warns_once_at_teardown(toy, pool):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        branching_loop(toy, "cap,ptm,plm", pool, batched=True)
    never = [w for w in caught if issubclass(w.category, HookNeverCalled)]
    assert len(never) == 1, [str(w.message) for w in caught]
    message = str(never[0].message)
    assert "'cap' implements dm_select_real" in message and "plugins.select_real(" in message
    assert "'plm' implements dm_auxiliary_loss" in message and "plugins.auxiliary_loss(" in message
    assert "'ptm'" not in message              # the shared extractor line reached ptm
    assert never[0].filename == __file__       # pointed at the loop's teardown line


def test_the_per_class_glue_in_the_per_class_branch_is_quiet(toy, pool):
    with warnings.catch_warnings():
        warnings.simplefilter("error", HookNeverCalled)
        branching_loop(toy, "cap,ptm,plm", pool, batched=False)


class TinyBNNet(TinyNet):
    """TinyNet with batch norm in place of group norm (the original code's ConvNetBN)."""

    def __init__(self):
        super().__init__()
        for i in (1, 5):
            self.features[i] = torch.nn.BatchNorm2d(4)


def _graft_md_block(marker):
    text = (ROOT / "docs" / "graft.md").read_text()
    code = re.search(r"```python\n(.*?)```", text[text.index(marker):], re.S).group(1)
    return compile(code, f"docs/graft.md {marker}", "exec")


@pytest.mark.parametrize("factory", [TinyNet, TinyBNNet], ids=["group-norm", "batch-norm"])
def test_the_checks_of_graft_md_hold_in_a_grafted_loop(toy, pool, factory):
    experts = pool if factory is TinyNet else ExpertPool.train(
        factory, toy.images, toy.labels, num_experts=2, epochs=2, seed=0, batch_size=16, lr=0.05,
        progress=False)
    plugins = PluginSet.from_names("cap,ptm,plm", experts=experts)
    plugins.setup(num_classes=C, ipc=IPC, num_iterations=T, real=toy)
    syn = _syn_init(toy).requires_grad_(True)
    after_extractor = _graft_md_block("<!-- check-ptm-example -->")
    in_class_loop = _graft_md_block("<!-- check-cap-plm-example -->")
    kept = {}
    for t in range(T):
        net = plugins.extractor(t, fallback=factory)
        names = {"plugins": plugins, "pool": experts, "t": t, "T": T}
        exec(after_extractor, names)
        for c in range(C):
            out_real = net.embed(toy.images_of(c)).detach()
            out_syn = net.embed(syn[c * IPC:(c + 1) * IPC])
            names.update(c=c, out_real=out_real, out_syn=out_syn,
                         img_syn=syn[c * IPC:(c + 1) * IPC])
            exec(in_class_loop, names)
            kept[t, c] = int(names["keep"].sum())
    plugins.teardown()
    per_class = toy.class_size(0)
    assert [kept[0, c] for c in range(C)] == [per_class - 1] * C   # t = 0: one row dropped
    assert all(kept[T - 1, c] < per_class - 1 for c in range(C))
