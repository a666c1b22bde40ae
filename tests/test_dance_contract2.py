"""DANCE's inter-class step with augmentation on and ``iter_calib`` 2 (baselines/methods/dance.py,
adapters/dance.py): which generator each random draw comes from (the module docstring: "Every
random draw comes from a generator derived from the run seed and ``t`` (and the class or
step)"; the inter-class view draws "a new augmentation draw" per pass and, when asked, "a new
real batch of the class ... augmented together with the synthetic images, one draw"), that the
two calibration passes see different real batches and draws, and two hand-written iterations
with augmentation on and two passes (plain DANCE, and PLM's public-code reading)."""
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from adapters.dance import DANCEHost
from baselines.harness.factorization import decode
from baselines.methods import dance as dance_module
from baselines.methods.dance import DANCE
from dm_plugins import PluginSet
from dm_plugins.seeding import make_generator
from tests.conftest import group_scale_augment
from tests.test_dance import C, T, make_host, normalize, pixel_init

SEED = 3
CODE_PLM = {"logits": "extractor", "target": "batch", "sharpen": "sum", "tau": 0.01,
            "step": "separate", "lr": 0.01}
AUG, REAL, INTER_REAL, SUB, MIX = (dance_module._AUG_STREAM, dance_module._REAL_STREAM,
                                   dance_module._INTER_REAL_STREAM, dance_module._SUB_STREAM,
                                   dance_module._MIX_STREAM)


def _state(*parts):
    return make_generator(*parts).get_state()


class RecordingReal:
    """The toy data, recording each ``sample`` call: (class, generator state before the draw,
    the images drawn)."""

    def __init__(self, real):
        self.inner, self.num_classes, self.calls = real, real.num_classes, []

    def sample(self, c, n, generator):
        state = generator.get_state().clone()
        images = self.inner.sample(c, n, generator)
        self.calls.append((c, state, images))
        return images

    def images_of(self, c):
        return self.inner.images_of(c)


def recording_augment(calls):
    def augment(x, groups, generator):
        calls.append((x.shape[0], groups.clone(), generator.get_state().clone()))
        return group_scale_augment(x, groups, generator)
    return augment


def _host(toy, pool, plugins, real=None, **overrides):
    settings = dict(normalize=normalize, num_iterations=T, decode=partial(decode, factor=2),
                    batch_real=5, lr=0.05, momentum=0.5, seed=SEED, iter_calib=2)
    settings.update(overrides)
    return DANCEHost(real if real is not None else toy, pool, pixel_init(toy), plugins=plugins,
                     **settings)


def _which(state, names):
    hits = [name for name, s in names.items() if torch.equal(s, state)]
    assert len(hits) == 1, hits
    return hits[0]


@pytest.mark.parametrize("reading", ["dance", "code"])
def test_each_draw_of_an_iteration_comes_from_its_own_generator(reading, toy, pool):
    # catches: the inter-class draw seeded without the pass (both passes share one draw), with
    # the inner view's number, or its real batch drawn from the inner-class real stream
    aug_calls = []
    real = RecordingReal(toy)
    plugins = (PluginSet() if reading == "dance" else
               PluginSet.from_names("plm", experts=pool, options={"plm": CODE_PLM}))
    host = _host(toy, pool, plugins, real=real, augment=recording_augment(aug_calls))
    host.start()
    real.calls.clear()                                  # a plugin's setup probe is not a draw
    t = 1
    host.step(t)
    names = {("aug", v, s, c): _state(SEED, AUG, t, v, s, c)
             for v in (0, 1) for s in (0, 1) for c in range(C)}
    names.update({("real", c): _state(SEED, REAL, t, c) for c in range(C)})
    names.update({("inter_real", s, c): _state(SEED, INTER_REAL, t, s, c)
                  for s in (0, 1) for c in range(C)})
    seen = [_which(state, names) for _, _, state in aug_calls]
    assert seen == [("aug", 0, 0, c) for c in range(C)] + \
        [("aug", 1, s, c) for s in (0, 1) for c in range(C)]
    # one Siamese group per call: real and synthetic images of a class share the draw
    assert all(int(groups.abs().sum()) == 0 for _, groups, _ in aug_calls)
    with_real = reading == "code"
    sizes = [n for n, _, _ in aug_calls]
    assert sizes == [5 + 4] * C + [(5 + 4) if with_real else 4] * (2 * C)
    drawn = [(c, _which(state, names)) for c, state, _ in real.calls]
    expected = [(c, ("real", c)) for c in range(C)]
    if with_real:
        expected += [(c, ("inter_real", s, c)) for s in (0, 1) for c in range(C)]
    assert drawn == expected
    if with_real:   # the two passes (and the inner step) see different real batches
        batches = {name: images for (_, name), (_, _, images) in zip(drawn, real.calls)}
        for c in range(C):
            first, second = batches[("inter_real", 0, c)], batches[("inter_real", 1, c)]
            assert not torch.equal(first, second)
            assert not torch.equal(first, batches[("real", c)])
    host.close()


def test_the_two_passes_subsample_the_synthetic_images_with_their_own_draws(toy, pool):
    # catches: the inter-class subset drawn with the inner view's or the first pass's generator
    host = _host(toy, pool, PluginSet(), augment=group_scale_augment, batch_syn_max=2)
    seen, real_view = [], DANCE.synthetic_view

    def spy(self, c, t, view, step):
        images, labels = real_view(self, c, t, view, step)
        full, _ = decode(self.syn.detach()[c:c + 1], torch.tensor([c]), factor=2)  # IPC 1
        keep = torch.randperm(4, generator=make_generator(SEED, SUB, t, view, step, c))[:2]
        seen.append(((c, t, view, step), tuple(keep.tolist()),
                     torch.equal(images.detach(), full[keep])))
        return images, labels
    host.synthetic_view = spy.__get__(host)
    host.step(0)
    assert [key for key, _, _ in seen] == [(c, 0, 0, 0) for c in range(C)] + \
        [(c, 0, 1, s) for s in (0, 1) for c in range(C)]
    assert all(same for _, _, same in seen)
    # the test can tell the draws apart: the subsets of one class differ between views/passes
    assert any(len({keep for (c2, *_), keep, _ in seen if c2 == c}) > 1 for c in range(C))
    host.close()


def _sgd(bufs, which, x, grad, rate, m=0.5):
    bufs[which] = grad.clone() if bufs[which] is None else m * bufs[which] + grad
    return x - rate * bufs[which]


def _net_with(tiny_factory, state):
    net = tiny_factory()
    net.load_state_dict(state)
    return net


def _middle(tiny_factory, pool, t):
    mix = float(torch.rand((), generator=make_generator(SEED, MIX, t)))
    e = pool.experts[pool.pick(t)]
    return _net_with(tiny_factory, {n: mix * e.init_state[n] + (1 - mix) * e.trained_state[n]
                                    for n in e.init_state})


def _inner_steps(x, bufs, middle, toy, t, lr):
    for c in range(C):
        real = toy.sample(c, 5, make_generator(SEED, REAL, t, c))
        leaf = x.clone().requires_grad_(True)
        syn, _ = decode(leaf[c:c + 1], torch.tensor([c]), factor=2)
        both = group_scale_augment(torch.cat([real, normalize(syn)]),
                                   torch.zeros(9, dtype=torch.long),
                                   make_generator(SEED, AUG, t, 0, 0, c))
        target = middle.embed(both[:5]).detach()
        ((target.mean(0) - middle.embed(both[5:]).mean(0)) ** 2).sum().backward()
        x = _sgd(bufs, 0, x, leaf.grad, lr)
    return x


def test_two_iterations_with_augmentation_and_two_passes_equal_a_hand_written_dance(
        toy, pool, tiny_factory):
    """Plain DANCE: per class a matching step, then twice per class a hard-label CE step through
    the trained expert on a new augmentation draw of (t, inter view, pass, class); one shared
    SGD momentum buffer."""
    # catches: the second pass reusing the first pass's draw, or a second optimiser (buffer)
    lr = 0.05
    host = _host(toy, pool, PluginSet(), augment=group_scale_augment, lr=lr)
    x, bufs = pixel_init(toy), [None]
    for t in range(2):
        x = x.clamp(0, 1)
        middle = _middle(tiny_factory, pool, t)
        expert = _net_with(tiny_factory, pool.experts[pool.pick(t)].trained_state)
        x = _inner_steps(x, bufs, middle, toy, t, lr)
        ce = 0.0
        for s in range(2):
            for c in range(C):
                leaf = x.clone().requires_grad_(True)
                syn, labels = decode(leaf[c:c + 1], torch.tensor([c]), factor=2)
                syn_aug = group_scale_augment(normalize(syn), torch.zeros(4, dtype=torch.long),
                                              make_generator(SEED, AUG, t, 1, s, c))
                loss = F.cross_entropy(expert(syn_aug), labels)
                loss.backward()
                ce += float(loss.detach())
                x = _sgd(bufs, 0, x, leaf.grad, lr)
        metrics = host.step(t)
        torch.testing.assert_close(host.syn.detach(), x, rtol=1e-5, atol=1e-6)
        assert metrics["loss_ce"] == pytest.approx(ce, rel=1e-5)   # both passes, every class
    host.close()


def test_two_iterations_of_plms_code_reading_with_augmentation_and_two_passes(toy, pool,
                                                                              tiny_factory):
    """PLM's public-code reading on DANCE: per pass and class a new real batch of
    (t, pass, class), augmented with the synthetic images in one draw of (t, inter view, pass,
    class); the target from the trained expert's summed correct softmax over tau 0.01 on that
    augmented real batch, the logits from the inner-class network; a second SGD (lr 0.01, the
    host's momentum) for these steps."""
    # catches: the real batch augmented with a draw of its own (not the synthetic images'), or
    # the same real batch in both passes
    lr = 0.05
    host = _host(toy, pool, PluginSet.from_names("plm", experts=pool, options={"plm": CODE_PLM}),
                 augment=group_scale_augment, lr=lr)
    x, bufs = pixel_init(toy), [None, None]
    for t in range(2):
        x = x.clamp(0, 1)
        middle = _middle(tiny_factory, pool, t)
        final = _net_with(tiny_factory, pool.experts[pool.pick(t)].trained_state)
        x = _inner_steps(x, bufs, middle, toy, t, lr)
        plm = 0.0
        for s in range(2):
            for c in range(C):
                real = toy.sample(c, 5, make_generator(SEED, INTER_REAL, t, s, c))
                leaf = x.clone().requires_grad_(True)
                syn, _ = decode(leaf[c:c + 1], torch.tensor([c]), factor=2)
                both = group_scale_augment(torch.cat([real, normalize(syn)]),
                                           torch.zeros(9, dtype=torch.long),
                                           make_generator(SEED, AUG, t, 1, s, c))
                with torch.no_grad():
                    probs = final(both[:5]).softmax(1)
                correct = probs.argmax(1) == c
                assert bool(correct.any())
                label = (probs[correct].sum(0) / 0.01).softmax(0)
                loss = -(label * F.log_softmax(middle(both[5:]), dim=1)).sum(1).mean()
                loss.backward()
                plm += float(loss.detach())
                x = _sgd(bufs, 1, x, leaf.grad, 0.01)
        metrics = host.step(t)
        torch.testing.assert_close(host.syn.detach(), x, rtol=1e-5, atol=1e-6)
        assert metrics["loss_plm"] == pytest.approx(plm, rel=1e-5)
        assert "loss_ce" not in metrics
    host.close()
