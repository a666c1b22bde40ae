"""Behaviour of the core library pinned against independent expectations: golden seeds, the
real batch each (seed, t) defines, writes that fail midway, determinism across processes, the
diverse capacity mode through a host, PTM and PLM sharing an expert, PLM's temperature."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dm_plugins import DMHost, PluginSet
from dm_plugins.atomic import atomic_torch_save, atomic_write_bytes, atomic_write_json
from dm_plugins.capacity import capacity_keep_mask
from dm_plugins.seeding import _splitmix64, derive_seed, make_generator

ROOT = Path(__file__).resolve().parents[1]


# -- seeds --------------------------------------------------------------------------------------
def test_splitmix64_matches_the_published_first_output():
    # SplitMix64 (Steele, Lea & Flood 2014) seeded with 0: first output 0xE220A8397B1DCDAF
    assert _splitmix64(0) == 0xE220A8397B1DCDAF


def test_derive_seed_golden_values():
    """Resuming a run with a newer version depends on these never changing."""
    assert derive_seed(0) == 716632666546416052
    assert derive_seed(0, 0x5E, 0) == 5782587611160794022
    assert derive_seed(1, 2, 3) == 8540368435173492241
    assert derive_seed(0xE7, 5) == 3797312555264596242
    assert derive_seed(123456789, 0x4E, 19999) == 4965560657362562926
    assert derive_seed(1, 2) != derive_seed(2, 1)            # order matters
    assert 0 <= derive_seed(-1, 2 ** 70) < 2 ** 63           # any ints, 63-bit result
    # the top bit of the 64-bit hash is dropped (torch seeds must fit a signed 64-bit int):
    from dm_plugins.seeding import _MASK64
    raw = [_splitmix64(0x5EED ^ i) for i in range(64)]
    assert any(r >> 63 for r in raw)                        # the mask matters for these inputs
    assert [derive_seed(i) for i in range(64)] == [r & (2 ** 63 - 1) for r in raw]
    assert _MASK64 == 2 ** 64 - 1


def test_make_generator_is_seeded_with_derive_seed():
    g = make_generator(3, 4)
    expected = torch.Generator().manual_seed(derive_seed(3, 4))
    assert torch.equal(torch.rand(5, generator=g), torch.rand(5, generator=expected))


# -- the host's sampling ------------------------------------------------------------------------
def _syn(toy, ipc=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([toy.sample(c, ipc, g) for c in range(toy.num_classes)])


def test_iteration_t_uses_the_real_batch_its_seed_and_t_define(toy, tiny_factory):
    host = DMHost(toy, tiny_factory, _syn(toy), num_iterations=9, batch_real=5, seed=11)
    for t in (0, 4, 8):
        real, labels = host.real_batch(t)
        # by hand: one generator seeded from (seed, real stream 0x5E, t), classes in order,
        # a permutation of each class's indices, its first batch_real entries
        g = torch.Generator().manual_seed(derive_seed(11, 0x5E, t))
        expected = []
        for c in range(3):
            idx = (toy.labels == c).nonzero(as_tuple=True)[0]
            expected.append(toy.images[idx[torch.randperm(idx.numel(), generator=g)[:5]]])
        assert torch.equal(real, torch.cat(expected))
        assert labels.tolist() == [c for c in range(3) for _ in range(5)]
    assert not torch.equal(host.real_batch(0)[0], host.real_batch(1)[0])


def test_plain_dm_network_of_iteration_t_is_drawn_from_seed_and_t(toy, tiny_factory):
    host = DMHost(toy, tiny_factory, _syn(toy), num_iterations=5, seed=2)
    net = host.prepare_extractor(3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(2, 0x4E, 3))
        fresh = tiny_factory()
    for (name, p), q in zip(net.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name


# -- atomic writes ------------------------------------------------------------------------------
class _BrokenMidway:
    """Pickles to a stream that fails after some bytes are written."""

    def __reduce__(self):
        raise RuntimeError("disk full (simulated)")


@pytest.mark.parametrize("writer", ["torch", "bytes"])
def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temp(tmp_path, writer):
    target = tmp_path / "state.pt"
    target.write_bytes(b"old contents")
    with pytest.raises(RuntimeError, match="disk full"):
        if writer == "torch":
            # a big tensor first, so bytes are written before the failure
            atomic_torch_save(target, {"a": torch.zeros(100_000), "b": _BrokenMidway()})
        else:
            from dm_plugins import atomic

            def write_then_fail(f):
                f.write(b"x" * 65536)
                f.flush()
                raise RuntimeError("disk full (simulated)")
            atomic._atomic_write(target, write_then_fail)
    assert target.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_atomic_writes_replace_whole_files(tmp_path):
    target = tmp_path / "sub" / "x.json"
    atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    atomic_write_bytes(target, b"{}")
    assert target.read_bytes() == b"{}"
    with pytest.raises(TypeError):
        atomic_write_json(target, {"a": object()})
    assert target.read_bytes() == b"{}"


# -- determinism across processes ---------------------------------------------------------------
_RUN = textwrap.dedent('''
    import hashlib, sys, torch
    sys.path.insert(0, {root!r})
    from tests.conftest import make_toy, TinyNet, group_scale_augment
    from dm_plugins import DMHost, ExpertPool, PluginSet
    torch.set_num_threads(1)
    toy = make_toy()
    pool = ExpertPool.train(TinyNet, toy.images, toy.labels, num_experts=2, epochs=2,
                            batch_size=12, progress=False)
    g = torch.Generator().manual_seed(1)
    syn = torch.cat([toy.sample(c, 2, g) for c in range(3)])
    host = DMHost(toy, TinyNet, syn, num_iterations=4, batch_real=5, augment=group_scale_augment,
                  plugins=PluginSet.from_names("cap,ptm,plm", experts=pool), seed=3)
    out = host.run(progress=False)
    print(hashlib.sha256(out.numpy().tobytes()).hexdigest())
''')


def test_same_seed_same_synthetic_set_across_processes():
    code = _RUN.format(root=str(ROOT))
    digests = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=300, check=True).stdout.strip() for _ in range(2)]
    assert len(digests[0]) == 64 and digests[0] == digests[1]


# -- plugins through the host -------------------------------------------------------------------
def test_diverse_capacity_mode_through_the_host(toy, tiny_factory):
    """IPC >= alpha: the host keeps exactly the Eq. 4 diverse-mode rows of each class."""
    plugins = PluginSet.from_names("cap", options={"cap": {"alpha": 2}})
    host = DMHost(toy, tiny_factory, _syn(toy, ipc=2), num_iterations=4, plugins=plugins,
                  batch_real=8, seed=0)
    t = 3
    _, metrics = host.compute_loss(t)
    net = host.extractor
    real, labels = host.real_batch(t)
    syn, syn_labels = host.synthetic_batch()
    with torch.no_grad():
        rf, sf = net.embed(real), net.embed(syn)
    kept = sum(int(capacity_keep_mask(rf[labels == c], sf[syn_labels == c], t, 4,
                                      "diverse").sum()) for c in range(3))
    assert plugins.plugins()[0].mode == "diverse"
    assert metrics["real_kept"] == pytest.approx(kept / real.shape[0])
    typical = sum(int(capacity_keep_mask(rf[labels == c], sf[syn_labels == c], t, 4,
                                         "typical").sum()) for c in range(3))
    assert kept != typical


def test_ptm_and_plm_use_the_same_expert_every_iteration(toy, tiny_factory, pool, monkeypatch):
    used = {"ptm": [], "plm": []}
    pair, trained = pool.parameter_pair, pool.trained_network

    def spy_pair(index, device="cpu"):
        used["ptm"].append(index)
        return pair(index, device)

    def spy_trained(index, *args, **kwargs):
        used["plm"].append(index)
        return trained(index, *args, **kwargs)
    plugins = PluginSet.from_names("ptm,plm", experts=pool)
    host = DMHost(toy, tiny_factory, _syn(toy), num_iterations=12, plugins=plugins, batch_real=4)
    host._ensure_setup()
    monkeypatch.setattr(pool, "parameter_pair", spy_pair)
    monkeypatch.setattr(pool, "trained_network", spy_trained)
    for t in range(12):
        used["ptm"].clear()
        used["plm"].clear()
        host.step(t)
        assert set(used["ptm"]) == {pool.pick(t)}
        assert set(used["plm"]) == {pool.pick(t)}
    assert len({pool.pick(t) for t in range(12)}) == 2     # both experts were exercised
    host.close()


@pytest.mark.parametrize("tau", [0.1, 0.5, 2.0])
def test_plm_targets_follow_tau(pool, toy, tau):
    """Eq. 8 with the plugin's tau: softmax(y_avg / tau), y_avg over correct predictions."""
    plugins = PluginSet.from_names("plm", experts=pool,
                                   options={"plm": {"tau": tau, "max_real_per_class": 100}})
    plugins.setup(num_classes=3, ipc=1, num_iterations=4, real=toy)
    plm = plugins.plugins()[0]
    for k in range(2):
        net = pool.trained_network(k)
        rows = []
        for c in range(3):
            p = F.softmax(net(toy.images_of(c)), dim=1)
            rows.append(p[p.argmax(1) == c].mean(0))
        expected = F.softmax(torch.stack(rows) / tau, dim=1)
        torch.testing.assert_close(plm.pseudo_labels(k), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(plm.pseudo_labels(0), plm.pseudo_labels(1))  # per-expert targets
