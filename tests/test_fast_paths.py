"""Every speed option of the host gives the plain computation's loss and gradient."""
import pytest
import torch

from dm_plugins import DMHost, PluginSet
from tests.conftest import group_scale_augment


def _loss_and_grad(toy, factory, pool, spec, **options):
    g = torch.Generator().manual_seed(1)
    syn = torch.cat([toy.sample(c, 2, g) for c in range(3)])
    plugins = PluginSet.from_names(spec, experts=pool)
    host = DMHost(toy, factory, syn, num_iterations=10, plugins=plugins,
                  augment=group_scale_augment, batch_real=7, seed=5, **options)
    loss, metrics = host.compute_loss(6)
    loss.backward()
    host.close()
    return loss.detach(), host.syn.grad.clone(), metrics


@pytest.mark.parametrize("spec", ["none", "cap,ptm,plm"])
@pytest.mark.parametrize("options", [{"channels_last": True}, {"real_chunk": 4},
                                     {"channels_last": True, "real_chunk": 5}],
                         ids=["channels-last", "chunked", "both"])
def test_fast_options_equal_plain(toy, tiny_factory, pool, spec, options):
    loss, grad, metrics = _loss_and_grad(toy, tiny_factory, pool, spec)
    fast_loss, fast_grad, fast_metrics = _loss_and_grad(toy, tiny_factory, pool, spec, **options)
    torch.testing.assert_close(fast_loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast_grad, grad, rtol=1e-4, atol=1e-6)
    assert fast_metrics["real_kept"] == metrics["real_kept"]


def _cpp_compiler():
    import os
    import shutil
    return next((shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++")
                 if shutil.which(c)), None)


@pytest.mark.skipif(_cpp_compiler() is None, reason="no C++ compiler for torch.compile's inductor")
def test_compiled_real_forward_equals_eager(toy, tiny_factory, pool):
    """Skipped only when the precondition (a C++ compiler) is missing; any other failure of the
    compiled path fails the test."""
    loss, grad, _ = _loss_and_grad(toy, tiny_factory, pool, "none")
    fast_loss, fast_grad, _ = _loss_and_grad(toy, tiny_factory, pool, "none", compile_real=True)
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
        "--num-experts", "2", "--synthetic-per-class", "6", "--synthetic-size", "16",
        "--arch", "convnetd2", "--width", "8", "--json", str(out), "--device", "cpu"]) == 0
    import json
    rows = json.loads(out.read_text())["rows"]
    assert {(r["ipc"], r["variant"]) for r in rows} == {
        (i, v) for i in (1, 2) for v in iteration_cost.VARIANTS}
    for r in rows:
        assert r["seconds_median"] > 0 and r["peak_memory_mb"] > 0
        assert r["ratio_to_naive"] > 0
    assert "| IPC | variant |" in capsys.readouterr().out


def test_channels_last_training_equals_plain(toy, tiny_factory):
    from dm_plugins.training import train_classifier
    nets = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        net = tiny_factory()
        train_classifier(net, toy.images, toy.labels, epochs=2, batch_size=8, lr=0.05,
                         generator=torch.Generator().manual_seed(0), progress=False,
                         channels_last=channels_last)
        nets.append(net)
    for (name, a), b in zip(nets[0].state_dict().items(), nets[1].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_default_run_names_are_not_reused(tmp_path):
    from baselines.dm import _unused
    base = tmp_path / "runs" / "dm-digits"
    assert _unused(str(base)) == str(base)
    base.mkdir(parents=True)
    assert _unused(str(base)) == f"{base}-2"
