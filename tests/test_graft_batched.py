"""The batched-branch graft of docs/graft.md, executed as written: bit-identical to the plain
batched loop (the original DM code's BatchNorm branch) with no plugins, and equal to that loop
with each plugin's effect written out by hand."""
import re
import warnings
from pathlib import Path

import pytest
import torch

from dm_plugins import ExpertPool, PluginSet
from dm_plugins.capacity import capacity_keep_mask
from dm_plugins.manager import HookNeverCalled
from dm_plugins.pseudo_label import pseudo_label_loss
from tests.conftest import TinyNet
from tests.test_graft import augment, plm_targets_by_hand

ROOT = Path(__file__).resolve().parents[1]
C, IPC, T, BATCH = 3, 2, 4, 5


def example():
    text = (ROOT / "docs" / "graft.md").read_text()
    start = text.index("<!-- batched-graft-example -->")
    code = re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)
    namespace = {}
    exec(compile(code, "docs/graft.md batched example", "exec"), namespace)
    return namespace["distill_batched"]


def syn_init(real):
    g = torch.Generator().manual_seed(7)
    return torch.cat([real.sample(c, IPC, g) for c in range(C)]).requires_grad_(True)


def bare_batched(real, *, net_for=None, filter_real=None, extra_loss=None):
    """The original batched shape, with a plugin's effect written out by hand (tests only)."""
    torch.manual_seed(0)
    syn = syn_init(real)
    opt = torch.optim.SGD([syn], lr=0.5, momentum=0.5)
    losses = []
    for it in range(T):
        net = TinyNet() if net_for is None else net_for(it)
        net.train()
        for p in net.parameters():
            p.requires_grad = False
        reals, syns = [], []
        for c in range(C):
            idx = torch.randperm(real.class_size(c))[:BATCH]
            seed = int(torch.randint(0, 100000, ()))
            reals.append(augment(real.images_of(c)[idx], seed))
            syns.append(augment(syn[c * IPC:(c + 1) * IPC], seed))
        reals, syns = torch.cat(reals), torch.cat(syns)
        out_real = net.embed(reals).detach()
        out_syn = net.embed(syns)
        if filter_real is None:
            mean_real = torch.mean(out_real.reshape(C, BATCH, -1), dim=1)
        else:
            mean_real = torch.stack([filter_real(c, out_real[c * BATCH:(c + 1) * BATCH],
                                                 out_syn[c * IPC:(c + 1) * IPC], it).mean(0)
                                     for c in range(C)])
        loss = torch.sum((mean_real - torch.mean(out_syn.reshape(C, IPC, -1), dim=1)) ** 2)
        if extra_loss is not None:
            loss = loss + extra_loss(syns, it)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
    return syn.detach(), torch.stack(losses)


@pytest.fixture(scope="module")
def experts(toy, tmp_path_factory):
    return ExpertPool.load_or_train(tmp_path_factory.mktemp("batched"), TinyNet, toy.images,
                                    toy.labels, num_experts=2, epochs=3, batch_size=12, lr=0.05,
                                    progress=False)


def grafted(real, spec, experts, **options):
    torch.manual_seed(0)
    plugins = PluginSet.from_names(spec, experts=experts, options=options)
    plugins.setup(num_classes=C, ipc=IPC, num_iterations=T, real=real)
    result = example()(real, syn_init(real), plugins, num_classes=C, ipc=IPC, batch_real=BATCH,
                       iterations=T, new_network=TinyNet, augment=augment)
    plugins.teardown()
    return result


def test_no_plugins_is_bit_identical_to_the_plain_batched_loop(toy, experts):
    syn, losses = bare_batched(toy)
    g_syn, g_losses = grafted(toy, "none", experts)
    assert torch.equal(losses, g_losses) and torch.equal(syn, g_syn)


def test_cap_filters_each_class_exactly_eq4(toy, experts):
    def by_hand(c, out_real, out_syn, it):
        return out_real[capacity_keep_mask(out_real, out_syn, it, T, "typical")]
    syn, losses = bare_batched(toy, filter_real=by_hand)
    g_syn, g_losses = grafted(toy, "cap", experts)
    torch.testing.assert_close(g_losses, losses)
    torch.testing.assert_close(g_syn, syn)
    assert not torch.equal(losses, bare_batched(toy)[1])


def test_ptm_supplies_exactly_eq5(toy, experts):
    def by_hand(it):
        e = experts.experts[experts.pick(it)]
        with torch.random.fork_rng(devices=[]):
            net = TinyNet()
        net.load_state_dict({n: (it / T) * e.trained_state[n] + (1 - it / T) * e.init_state[n]
                             for n in e.init_state})
        return net
    syn, losses = bare_batched(toy, net_for=by_hand)
    g_syn, g_losses = grafted(toy, "ptm", experts)
    torch.testing.assert_close(g_losses, losses)
    torch.testing.assert_close(g_syn, syn)


def test_plm_over_every_class_at_once_is_exactly_eq9(toy, experts):
    targets = plm_targets_by_hand(experts, toy)
    labels = torch.arange(C).repeat_interleave(IPC)

    def by_hand(syns, it):
        k = experts.pick(it)
        return pseudo_label_loss(experts.trained_network(k)(syns), labels, targets[k])
    syn, losses = bare_batched(toy, extra_loss=by_hand)
    g_syn, g_losses = grafted(toy, "plm", experts, plm={"max_real_per_class": 100})
    torch.testing.assert_close(g_losses, losses)
    torch.testing.assert_close(g_syn, syn)


def test_the_batched_glue_reaches_every_plugin_and_stays_quiet(toy, experts):
    with warnings.catch_warnings():
        warnings.simplefilter("error", HookNeverCalled)
        grafted(toy, "cap,ptm,plm", experts, plm={"max_real_per_class": 100})
