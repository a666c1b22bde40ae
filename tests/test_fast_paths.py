"""Every speed option of the host gives the plain computation's loss and gradient."""
import pytest
import torch

from dm_plugins import DMHost, PluginSet
from tests.conftest import group_scale_augment


def _loss_and_grad(toy, factory, pool, spec, plugin_options=None, **options):
    g = torch.Generator().manual_seed(1)
    syn = torch.cat([toy.sample(c, 2, g) for c in range(3)])
    plugins = PluginSet.from_names(spec, experts=pool, **(plugin_options or {}))
    host = DMHost(toy, factory, syn, num_iterations=10, plugins=plugins,
                  augment=group_scale_augment, batch_real=7, seed=5, **options)
    loss, metrics = host.compute_loss(6)
    loss.backward()
    host.close()
    return loss.detach(), host.syn.grad.clone(), metrics


@pytest.mark.parametrize("spec", ["none", "cap,ptm,plm"])
@pytest.mark.parametrize("options", [{"channels_last": True}, {"real_chunk": 4},
                                     {"channels_last": True, "real_chunk": 5},
                                     {"syn_chunk": 1}, {"syn_chunk": 4, "real_chunk": 3},
                                     {"real_block": 7}, {"real_block": 14, "real_chunk": 3}],
                         ids=["channels-last", "chunked", "both", "syn-chunked", "all-chunked",
                              "class-blocks", "class-blocks-chunked"])
def test_fast_options_equal_plain(toy, tiny_factory, pool, spec, options):
    loss, grad, metrics = _loss_and_grad(toy, tiny_factory, pool, spec)
    fast_loss, fast_grad, fast_metrics = _loss_and_grad(toy, tiny_factory, pool, spec, **options)
    torch.testing.assert_close(fast_loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast_grad, grad, rtol=1e-4, atol=1e-6)
    assert fast_metrics["real_kept"] == metrics["real_kept"]


def test_real_class_blocks_bound_what_one_augmentation_call_holds(toy, tiny_factory, pool):
    """With real_block = one class's batch, the real images reach the augmentation one class at
    a time (with num_groups = C, so each keeps its draw) and the DSA'd result equals one block."""
    from baselines.harness.dsa import DSA
    dsa = DSA(flip=False)
    calls = []

    def spy(x, groups, generator, num_groups=None):
        calls.append((x.shape[0], num_groups))
        return dsa.siamese(x, groups, generator, num_groups)

    def run(**options):
        calls.clear()
        g = torch.Generator().manual_seed(1)
        syn = torch.cat([toy.sample(c, 2, g) for c in range(3)])
        host = DMHost(toy, tiny_factory, syn, num_iterations=10, augment=spy, batch_real=7,
                      seed=5, plugins=PluginSet.from_names("cap", experts=pool), **options)
        loss, metrics = host.compute_loss(6)
        loss.backward()
        return loss.detach(), host.syn.grad.clone(), metrics, list(calls)

    loss, grad, metrics, whole = run()
    assert whole == [(6, None), (21, None)]               # synthetic, then all real at once
    b_loss, b_grad, b_metrics, blocked = run(real_block=7)
    assert blocked == [(6, None), (7, 3), (7, 3), (7, 3)]  # then one class a call
    torch.testing.assert_close(b_loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b_grad, grad, rtol=1e-4, atol=1e-6)
    assert b_metrics["real_kept"] == metrics["real_kept"] < 1


def _cpp_compiler():
    import os
    import shutil
    return next((shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++")
                 if shutil.which(c)), None)


@pytest.mark.skipif(_cpp_compiler() is None, reason="no C++ compiler for torch.compile's inductor")
def test_compiled_forwards_equal_eager(toy, tiny_factory, pool):
    """The real forward, the synthetic forward (chunked, with its backward) and PLM's expert,
    all compiled. Skipped only when the precondition (a C++ compiler) is missing; any other
    failure of the compiled path fails the test."""
    loss, grad, _ = _loss_and_grad(toy, tiny_factory, pool, "plm", syn_chunk=4)
    fast_loss, fast_grad, _ = _loss_and_grad(toy, tiny_factory, pool, "plm", {"compile": True},
                                             compile_real=True, compile_syn=True, syn_chunk=4)
    torch.testing.assert_close(fast_loss, loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast_grad, grad, rtol=1e-3, atol=1e-5)


def test_dsa_split_calls_equal_one_siamese_call():
    """The host augments real and synthetic images in two calls with identically seeded
    generators; class c must get the same transform as in one Siamese call over both."""
    from baselines.harness.dsa import DSA
    dsa = DSA()
    g = torch.Generator().manual_seed(0)
    real = torch.randn(12, 3, 16, 16, generator=g)
    syn = torch.randn(6, 3, 16, 16, generator=g)
    real_groups = torch.arange(3).repeat_interleave(4)
    syn_groups = torch.arange(3).repeat_interleave(2)
    for seed in range(8):
        both = dsa.siamese(torch.cat([real, syn]), torch.cat([real_groups, syn_groups]),
                           torch.Generator().manual_seed(seed))
        a = dsa.siamese(real, real_groups, torch.Generator().manual_seed(seed))
        b = dsa.siamese(syn, syn_groups, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(torch.cat([a, b]), both)


def test_benchmark_runs_with_tiny_sizes(tmp_path, capsys):
    from benchmarks import iteration_cost
    out = tmp_path / "bench.json"
    assert iteration_cost.main([
        "--ipc", "1,2", "--batch-real", "4", "--warmup", "1", "--repeats", "2",
        "--num-experts", "2", "--synthetic-per-class", "8", "--synthetic-size", "16",
        "--arch", "convnetd2", "--width", "8", "--json", str(out), "--device", "cpu"]) == 0
    import json
    rows = json.loads(out.read_text())["rows"]
    assert {(r["ipc"], r["variant"]) for r in rows} == {
        (i, v) for i in (1, 2) for v in iteration_cost.VARIANTS}
    for r in rows:
        assert r["seconds_median"] > 0 and r["peak_memory_mb"] > 0
        assert r["ratio_to_naive"] > 0
        assert 0 <= r["iteration_memory_mb"] <= r["peak_memory_mb"]
        method = r["variant"].split("+")[0]
        assert (r["stages"] is not None) == (r["variant"] != "naive")
        if method in iteration_cost.METHOD_STAGES:  # every IDM / DANCE stage ran
            assert set(r["stages"]) == {*iteration_cost.METHOD_STAGES[method], "rest"}
            assert min(v for k, v in r["stages"].items() if k != "rest") > 0
        elif r["stages"] is not None:
            assert r["stages"]["real_forward"] > 0 and r["stages"]["backward"] > 0
            assert ("auxiliary_losses" in r["stages"]) == True  # noqa: E712 (always timed)
    out_text = capsys.readouterr().out
    assert "| IPC | variant |" in out_text
    for method in ("dm", "idm", "dance"):
        assert f"Stage breakdown ({method})" in out_text


def test_benchmark_chunk_sweep_prints_each_chunk(capsys):
    from benchmarks import iteration_cost
    assert iteration_cost.main([
        "--chunk-sweep", "2,5,100", "--batch-real", "4", "--warmup", "1", "--repeats", "1",
        "--synthetic-per-class", "8", "--synthetic-size", "16", "--arch", "convnetd2",
        "--width", "8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert [line.split("|")[1].strip() for line in out.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip().isdigit()] == ["2", "5", "100"]


def _trained_plain_and_with(toy, tiny_factory, **option):
    """The same tiny network trained twice (same seeds), plainly and with ``option``; the
    weights are checked equal up to float rounding; returns both networks."""
    from dm_plugins.training import train_classifier
    nets = []
    for kwargs in ({}, option):
        torch.manual_seed(0)
        net = tiny_factory()
        train_classifier(net, toy.images, toy.labels, epochs=2, batch_size=8, lr=0.05,
                         generator=torch.Generator().manual_seed(0), progress=False, **kwargs)
        nets.append(net)
    for (name, a), b in zip(nets[0].state_dict().items(), nets[1].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    return nets


def test_channels_last_training_equals_plain(toy, tiny_factory):
    _trained_plain_and_with(toy, tiny_factory, channels_last=True)


def test_default_run_names_are_not_reused(tmp_path):
    from baselines.dm import _unused
    base = tmp_path / "runs" / "dm-digits"
    assert _unused(str(base)) == str(base)
    base.mkdir(parents=True)
    assert _unused(str(base)) == f"{base}-2"


# -- the chunked real forward ---------------------------------------------------------------
def test_chunked_class_means_equal_the_means_of_one_forward():
    from dm_plugins.chunking import chunked_class_means, chunked_features
    from dm_plugins.loop import class_means
    g = torch.Generator().manual_seed(3)
    x = torch.randn(11, 4, generator=g)
    labels = torch.tensor([0, 2, 2, 1, 0, 0, 2, 1, 1, 2, 0])
    weight = torch.randn(4, 5, generator=g)
    embed = lambda part: part @ weight  # noqa: E731
    want = class_means(x @ weight, labels, 4)           # class 3 absent: a zero row
    for chunk in (1, 3, 4, 11, 100):
        torch.testing.assert_close(chunked_class_means(embed, x, labels, 4, chunk), want)
        torch.testing.assert_close(chunked_features(embed, x, chunk), x @ weight)
    assert chunked_class_means(embed, x, labels, 4, 3)[3].abs().sum() == 0


def test_chunked_class_means_hold_one_chunk_of_features_at_a_time():
    from dm_plugins.chunking import chunked_class_means
    seen = []

    def embed(part):
        seen.append(part.shape[0])
        return part.sum(dim=(1, 2, 3)).unsqueeze(1)
    x = torch.ones(10, 1, 2, 2)
    means = chunked_class_means(embed, x, torch.zeros(10, dtype=torch.long), 1, 4)
    assert seen == [4, 4, 2] and means.tolist() == [[4.0]]


def test_batch_independent_detects_batchnorm_in_training_mode(tiny_factory):
    from dm_plugins.chunking import batch_independent
    bn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    assert not batch_independent(bn.train())
    assert batch_independent(bn.eval())
    assert batch_independent(tiny_factory())   # no batch-coupled layer


def test_host_runs_a_batchnorm_extractor_on_the_whole_real_batch(toy):
    """Chunking would change BatchNorm's batch statistics, so a BN network is never chunked:
    any real_chunk gives the one-batch result."""
    from baselines.harness.networks import get_network

    def bn_factory():
        return get_network("convnetd2", 1, 3, 8, width=8, norm="batchnorm")
    loss, grad, _ = _loss_and_grad(toy, bn_factory, None, "none", real_chunk=1 << 20)
    chunked_loss, chunked_grad, _ = _loss_and_grad(toy, bn_factory, None, "none", real_chunk=2)
    torch.testing.assert_close(chunked_loss, loss, rtol=0, atol=0)
    torch.testing.assert_close(chunked_grad, grad, rtol=0, atol=0)


def test_default_real_chunk_depends_on_the_device_type(toy, tiny_factory):
    from dm_plugins.chunking import DEFAULT_REAL_CHUNK, default_real_chunk
    assert default_real_chunk("cpu") == DEFAULT_REAL_CHUNK["cpu"]
    assert default_real_chunk(torch.device("cuda", 1)) == DEFAULT_REAL_CHUNK["cuda"]
    syn = torch.cat([toy.sample(c, 1, torch.Generator().manual_seed(0)) for c in range(3)])
    assert DMHost(toy, tiny_factory, syn, num_iterations=1).real_chunk == DEFAULT_REAL_CHUNK["cpu"]


# -- stage timing ---------------------------------------------------------------------------
def test_stage_timer_times_each_stage_of_a_host_iteration(toy, tiny_factory, pool):
    from dm_plugins.profiling import StageTimer
    timer = StageTimer()
    syn = torch.cat([toy.sample(c, 2, torch.Generator().manual_seed(1)) for c in range(3)])
    host = DMHost(toy, tiny_factory, syn, num_iterations=2, batch_real=4, stage_timer=timer,
                  plugins=PluginSet.from_names("cap,plm", experts=pool),
                  augment=group_scale_augment)
    host.step(0)
    host.close()
    assert set(timer.seconds) == {"extractor", "real_batch", "augment_real", "real_forward",
                                  "synthetic_forward", "cap", "auxiliary_losses", "backward",
                                  "optimizer_step"}
    assert all(v > 0 for v in timer.seconds.values())
    timer.reset()
    assert not timer.seconds


def test_disabled_stage_timer_records_nothing():
    from dm_plugins.profiling import StageTimer
    timer = StageTimer(enabled=False)
    with timer("x"):
        pass
    assert not timer.seconds


def test_checkpointed_forward_recomputes_one_chunk_at_a_time_in_backward():
    from dm_plugins.chunking import checkpointed_forward
    calls = []
    weight = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))

    def fn(part):
        calls.append(part.shape[0])
        return torch.tanh(part @ weight)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
    want_grad, = torch.autograd.grad(torch.tanh(x @ weight).pow(2).sum(), x)
    out = checkpointed_forward(fn, x, 2)
    assert calls == [2, 2, 2]                       # forward: no graph kept, inputs only
    out.pow(2).sum().backward()
    assert calls == [2, 2, 2, 2, 2, 2]              # backward: each chunk recomputed once
    torch.testing.assert_close(x.grad, want_grad)
    calls.clear()
    checkpointed_forward(fn, x, 6)
    assert calls == [6]                             # one chunk: the plain forward


def test_plm_chunked_expert_forward_gives_the_same_loss_and_gradient(toy, pool):
    from dm_plugins import DistillContext
    from dm_plugins.pseudo_label import PseudoLabelMatching
    ctx = DistillContext(num_classes=3, ipc=2, num_iterations=4, real=toy, seed=0)
    syn = torch.cat([toy.sample(c, 2, torch.Generator().manual_seed(2)) for c in range(3)])
    labels = torch.arange(3).repeat_interleave(2)
    results = []
    for chunk in (None, 1, 4):
        plugin = PseudoLabelMatching(pool, chunk=chunk)
        plugin.dm_setup(ctx)
        x = syn.clone().requires_grad_(True)
        loss = plugin.dm_auxiliary_loss(x, labels, 3, extractor=None, real_images=None,
                                        real_labels=None)["plm"]
        loss.backward()
        results.append((loss.detach(), x.grad))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        torch.testing.assert_close(grad, results[0][1])
    with pytest.raises(Exception, match="chunk must be >= 1"):
        PseudoLabelMatching(pool, chunk=0)


@pytest.mark.skipif(_cpp_compiler() is None, reason="no C++ compiler for torch.compile's inductor")
def test_compiled_evaluation_training_equals_eager(toy, tiny_factory):
    """``compile=True`` trains the same network (its own parameters, through torch.compile)
    to the same weights up to float rounding."""
    plain, compiled = _trained_plain_and_with(toy, tiny_factory, compile=True)
    assert type(compiled) is type(plain)          # the module itself, not a compiled wrapper


def test_eval_compile_reaches_the_training_loop(monkeypatch, tmp_path):
    """``--eval-compile`` is recorded in the config and passed to every evaluation run."""
    import baselines.harness.evaluation as evaluation
    from baselines import dm
    seen = []
    real = evaluation.train_classifier

    def spy(*args, **kwargs):
        seen.append(kwargs["compile"])
        return real(*args, **{**kwargs, "compile": False})
    monkeypatch.setattr(evaluation, "train_classifier", spy)
    out = tmp_path / "run"
    assert dm.main(["--ipc", "1", "--iterations", "1", "--batch-real", "4", "--eval-runs", "2",
                    "--eval-epochs", "1", "--no-progress", "--device", "cpu", "--eval-compile",
                    "--out", str(out)]) == 0
    import json
    assert json.loads((out / "config.json").read_text())["eval_compile"] is True
    assert seen == [True, True]
