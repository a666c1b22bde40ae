"""The DM host's contract beyond "equals naive DM": defaults of the image optimiser, the decode
path, what the plugins' context carries, memory format / compile switches, metrics, re-setup after
close, and the one-line error messages (pinned in full)."""
import re
import time

import pytest
import torch

from baselines.harness import factorization
from dm_plugins import ClassIndexedTensors, DMHost, PluginSet, hookimpl
from dm_plugins.chunking import DEFAULT_REAL_CHUNK
from dm_plugins.loop import class_means


def _syn_init(toy, ipc, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([toy.sample(c, ipc, g) for c in range(toy.num_classes)])


class Recorder:
    """Records the context of every dm_setup / dm_teardown call."""
    name = "recorder"

    def __init__(self):
        self.setups, self.teardowns = [], []

    @hookimpl
    def dm_setup(self, context):
        self.setups.append(context)

    @hookimpl
    def dm_teardown(self, context):
        self.teardowns.append(context)


# -- class_means ----------------------------------------------------------------------------
def test_class_means_gives_zero_rows_for_absent_trailing_classes():
    f = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, -1.0]])
    means = class_means(f, torch.tensor([0, 0, 1]), 4)
    # class 0: mean of rows 0-1; class 1: row 2; classes 2, 3 absent -> zero rows
    assert means.tolist() == [[2.0, 4.0], [5.0, -1.0], [0.0, 0.0], [0.0, 0.0]]


# -- constructor defaults and the image optimiser ---------------------------------------------
def test_defaults_are_dms_image_optimiser_and_plain_settings(toy, tiny_factory):
    host = DMHost(toy, tiny_factory, _syn_init(toy, 1), num_iterations=2)
    assert host.batch_real == 256
    group = host.optimizer.param_groups[0]
    assert group["lr"] == 1.0 and group["momentum"] == 0.5     # DM: SGD lr 1, momentum 0.5
    assert group["params"][0] is host.syn
    assert host.seed == 0
    assert host.memory_format == torch.contiguous_format
    assert host.compile_real is False
    assert host.real_chunk == DEFAULT_REAL_CHUNK["cpu"]  # measured per device type
    assert host.decode is None and host.augment is None
    assert host.extra == {}
    assert host.iteration == 0 and host.ipc == 1 and host.num_classes == 3


def test_non_default_optimiser_settings_reach_sgd(toy, tiny_factory):
    host = DMHost(toy, tiny_factory, _syn_init(toy, 1), num_iterations=2, lr=0.25,
                  momentum=0.75, batch_real=5, seed=9, real_chunk=7)
    group = host.optimizer.param_groups[0]
    assert (group["lr"], group["momentum"]) == (0.25, 0.75)
    assert (host.batch_real, host.seed, host.real_chunk) == (5, 9, 7)


def test_one_sgd_step_moves_the_images_by_lr_times_gradient(toy, tiny_factory):
    # plain SGD with momentum: the first step is x - lr * grad (momentum buffer = grad)
    host = DMHost(toy, tiny_factory, _syn_init(toy, 1), num_iterations=3, lr=0.25,
                  momentum=0.75, batch_real=4)
    before = host.syn.detach().clone()
    loss, _ = host.compute_loss(0)
    grad, = torch.autograd.grad(loss, host.syn)
    host.step(0)
    torch.testing.assert_close(host.syn.detach(), before - 0.25 * grad)
    # the second step uses the momentum buffer: v = 0.75 * g0 + g1, x -= 0.25 * v
    before = host.syn.detach().clone()
    loss, _ = host.compute_loss(1)
    grad1, = torch.autograd.grad(loss, host.syn)
    host.step(1)
    torch.testing.assert_close(host.syn.detach(), before - 0.25 * (0.75 * grad + grad1))


def test_extractor_is_frozen(toy, tiny_factory):
    host = DMHost(toy, tiny_factory, _syn_init(toy, 1), num_iterations=2)
    assert not any(p.requires_grad for p in host.extractor.parameters())


# -- messages ---------------------------------------------------------------------------------
def test_uneven_synthetic_set_message(toy, tiny_factory):
    syn = torch.zeros(7, 1, 8, 8)
    with pytest.raises(ValueError, match=r"^7 synthetic images do not split evenly over 3 classes$"):
        DMHost(toy, tiny_factory, syn, num_iterations=2)


@pytest.mark.parametrize("name", ["num_iterations", "batch_real", "real_chunk", "syn_chunk"])
def test_positive_settings_message(toy, tiny_factory, name):
    kwargs = {"num_iterations": 2, name: 0}
    with pytest.raises(ValueError, match=rf"^DMHost: {name} must be >= 1, got 0$"):
        DMHost(toy, tiny_factory, _syn_init(toy, 1), **kwargs)


def test_checkpoint_shape_mismatch_message(toy, tiny_factory):
    big = DMHost(toy, tiny_factory, _syn_init(toy, 2), num_iterations=2)
    small = DMHost(toy, tiny_factory, _syn_init(toy, 1), num_iterations=2)
    expected = ("checkpoint holds synthetic images of shape (6, 1, 8, 8), this run expects "
                "(3, 1, 8, 8)")
    with pytest.raises(ValueError, match="^" + re.escape(expected) + "$"):
        small.load_state_dict(big.state_dict())


# -- decode -----------------------------------------------------------------------------------
def test_decode_receives_the_stored_images_and_feeds_the_loss(toy, tiny_factory):
    calls = []

    def decode(stored, labels):
        calls.append((stored, labels))
        return factorization.decode(stored, labels, 2)

    syn = _syn_init(toy, 1)
    host = DMHost(toy, tiny_factory, syn, num_iterations=3, decode=decode, batch_real=4)
    images, labels = host.synthetic_batch()
    assert calls[-1][0] is host.syn
    assert torch.equal(calls[-1][1], torch.tensor([0, 1, 2]))
    assert images.shape == (12, 1, 8, 8)
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4

    # the loss is DM's on the *decoded* images: check against a per-class computation
    t = 1
    loss, _ = host.compute_loss(t)
    net = host.extractor                       # re-initialised for t by compute_loss
    real, real_labels = host.real_batch(t)
    decoded, _ = factorization.decode(host.syn.detach(), labels, 2)
    with torch.no_grad():
        expected = sum(((net.embed(real[real_labels == c]).mean(0)
                         - net.embed(decoded[4 * c:4 * c + 4]).mean(0)) ** 2).sum()
                       for c in range(3))
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)

    # the gradient flows through decode back to the stored images
    host.step(t)
    assert host.syn.shape == syn.shape
    assert not torch.equal(host.syn.detach(), syn)


# -- what the plugins see -----------------------------------------------------------------------
def test_context_carries_the_hosts_settings(toy, tiny_factory):
    rec = Recorder()
    host = DMHost(toy, tiny_factory, _syn_init(toy, 2), num_iterations=4,
                  plugins=PluginSet([rec]), device="cpu:0", channels_last=True, seed=7,
                  extra={"method": "dm"})
    ctx = host.context()
    assert ctx.extractor is host.extractor
    assert ctx.device == torch.device("cpu:0")
    assert ctx.memory_format == torch.channels_last
    assert ctx.seed == 7
    assert ctx.extra == {"method": "dm"}
    assert (ctx.num_classes, ctx.ipc, ctx.num_iterations) == (3, 2, 4)
    assert ctx.real is toy
    host.prepare_extractor(0)                   # sets the plugins up with that context
    assert len(rec.setups) == 1 and rec.setups[0].seed == 7
    assert rec.setups[0].extra == {"method": "dm"}


def test_plugins_are_set_up_again_after_close(toy, tiny_factory):
    rec = Recorder()
    host = DMHost(toy, tiny_factory, _syn_init(toy, 1), num_iterations=2,
                  plugins=PluginSet([rec]), batch_real=2)
    host.run(progress=False)
    assert (len(rec.setups), len(rec.teardowns)) == (1, 1)
    host.step(1)                                # a second use of the same host
    assert (len(rec.setups), len(rec.teardowns)) == (2, 1)
    host.close()
    host.close()                                # idempotent
    assert (len(rec.setups), len(rec.teardowns)) == (2, 2)


# -- memory format and compile switches ---------------------------------------------------------
@pytest.mark.parametrize("channels_last", [False, True])
def test_channels_last_switch(toy, tiny_factory, channels_last):
    host = DMHost(toy, tiny_factory, _syn_init(toy, 1), num_iterations=2,
                  channels_last=channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert host.memory_format == fmt
    w = host.extractor.features[4].weight          # (4, 4, 3, 3): the two layouts differ
    assert w.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert w.is_contiguous() == (not channels_last)


@pytest.mark.parametrize("compile_real,compile_syn",
                         [(False, False), (True, False), (False, True), (True, True)])
def test_compile_options_compile_the_forward_once_per_network(toy, tiny_factory, monkeypatch,
                                                              compile_real, compile_syn):
    compiled, calls = [], []

    def fake_compile(fn):
        compiled.append(fn)

        def recorded(x):
            calls.append(torch.is_grad_enabled())
            return fn(x)
        return recorded

    monkeypatch.setattr(torch, "compile", fake_compile)
    host = DMHost(toy, tiny_factory, _syn_init(toy, 1), num_iterations=3, batch_real=2,
                  compile_real=compile_real, compile_syn=compile_syn)
    assert (host.compile_real, host.compile_syn) == (compile_real, compile_syn)
    host.compute_loss(0)
    host.compute_loss(1)                        # same (re-initialised) network: no recompile
    assert compiled == ([host.extractor.embed] if compile_real or compile_syn else [])
    # the compiled forward serves exactly the paths asked for: real (no graph), synthetic (graph)
    assert (False in calls, True in calls) == (compile_real, compile_syn)


@pytest.mark.parametrize("compile", [False, True])
def test_plm_compile_compiles_each_expert_network_once(toy, tiny_factory, pool, monkeypatch,
                                                       compile):
    from dm_plugins import PluginSet
    compiled, calls = [], []

    def fake_compile(fn):
        compiled.append(fn)

        def recorded(x):
            calls.append(fn)
            return fn(x)
        return recorded

    monkeypatch.setattr(torch, "compile", fake_compile)
    plugins = PluginSet.from_names("plm", experts=pool, compile=compile)
    host = DMHost(toy, tiny_factory, _syn_init(toy, 1), num_iterations=4, batch_real=2,
                  plugins=plugins)
    for t in range(4):                          # pick(t) visits both experts
        host.compute_loss(t)
    experts = {pool.trained_network(k, host.device, host.memory_format) for k in range(2)}
    used = {pool.trained_network(pool.pick(t), host.device, host.memory_format) for t in range(4)}
    assert len(used) == 2 and used <= experts
    assert (sorted(map(id, compiled)), set(map(id, calls))) == (
        (sorted(map(id, used)), set(map(id, used))) if compile else ([], set()))


# -- metrics -----------------------------------------------------------------------------------
def test_step_runs_the_requested_iteration_and_times_it(toy, tiny_factory):
    host = DMHost(toy, tiny_factory, _syn_init(toy, 1), num_iterations=6, batch_real=2)
    before = time.perf_counter()
    metrics = host.step(5)
    elapsed = time.perf_counter() - before
    assert metrics["iteration"] == 5
    assert host.iteration == 6
    assert 0.0 <= metrics["seconds"] <= elapsed


def test_step_5_equals_compute_loss_5(toy, tiny_factory):
    a = DMHost(toy, tiny_factory, _syn_init(toy, 1), num_iterations=6, batch_real=2)
    b = DMHost(toy, tiny_factory, _syn_init(toy, 1), num_iterations=6, batch_real=2)
    loss, _ = b.compute_loss(5)
    assert a.step(5)["loss"] == pytest.approx(float(loss.detach()), rel=1e-6)


def test_real_kept_is_one_with_a_single_real_image():
    g = torch.Generator().manual_seed(0)
    data = ClassIndexedTensors(torch.randn(3, 1, 8, 8, generator=g), torch.zeros(3, dtype=torch.long))
    from tests.conftest import TinyNet
    host = DMHost(data, lambda: TinyNet(channels=1, num_classes=1), data.images[:1],
                  num_iterations=1, batch_real=1)
    assert host.step()["real_kept"] == 1.0


# -- the run loop and its progress bar ------------------------------------------------------------
class FakeBar:
    """Stands in for tqdm: records the constructor arguments and the postfix calls."""
    made = []

    def __init__(self, iterable, **kwargs):
        self.iterable, self.kwargs, self.postfix = list(iterable), kwargs, []
        FakeBar.made.append(self)

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix(self, **kwargs):
        self.postfix.append(kwargs)


def test_run_resumes_with_a_progress_bar_and_calls_back(toy, tiny_factory, monkeypatch):
    import dm_plugins.synthetic as synthetic
    monkeypatch.setattr(synthetic, "tqdm", FakeBar)
    FakeBar.made = []
    rec = Recorder()
    host = DMHost(toy, tiny_factory, _syn_init(toy, 1), num_iterations=3, batch_real=2,
                  plugins=PluginSet([rec]))
    host.step(0)                                          # resume from iteration 1
    seen = []
    out = host.run(callback=lambda t, m: seen.append((t, m)))
    bar, = FakeBar.made
    assert bar.iterable == [1, 2]
    assert bar.kwargs == {"total": 3, "initial": 1, "desc": "distill", "disable": False}
    assert [t for t, _ in seen] == [1, 2] and [m["iteration"] for _, m in seen] == [1, 2]
    assert bar.postfix == [{"loss": f"{m['loss']:.3g}", "s_it": f"{m['seconds']:.2f}"}
                           for _, m in seen]
    assert torch.equal(out, host.syn.detach()) and not out.requires_grad
    assert host.iteration == 3 and len(rec.teardowns) == 1

    quiet = DMHost(toy, tiny_factory, _syn_init(toy, 1), num_iterations=1, batch_real=2)
    quiet.run(progress=False)
    assert FakeBar.made[-1].kwargs["disable"] is True


def test_run_tears_down_when_a_callback_fails(toy, tiny_factory):
    rec = Recorder()
    host = DMHost(toy, tiny_factory, _syn_init(toy, 1), num_iterations=3, batch_real=2,
                  plugins=PluginSet([rec]))

    def stop(t, metrics):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        host.run(callback=stop, progress=False)
    assert host.iteration == 1 and len(rec.teardowns) == 1
