"""Building plugins by name, entry points, registration rules, and hook toggling."""
import functools
import itertools
import textwrap

import pytest
import torch

from dm_plugins import (CapacityMatching, DMHost, PluginError, PluginSet, PseudoLabelMatching,
                        PseudoTrajectoryMatching, parse_plugin_names)


def test_parse_names():
    assert parse_plugin_names("cap,ptm,plm") == ["cap", "ptm", "plm"]
    assert parse_plugin_names(" PTM ") == ["ptm"]
    assert parse_plugin_names("none") == []
    assert parse_plugin_names("") == []
    with pytest.raises(PluginError, match="twice"):
        parse_plugin_names("cap,cap")
    with pytest.raises(PluginError, match="none"):
        parse_plugin_names("none,cap")


def test_unknown_name_lists_available_names_in_one_line():
    with pytest.raises(PluginError) as info:
        PluginSet.from_names("cap,bogus")
    msg = str(info.value)
    assert "\n" not in msg
    assert "'bogus'" in msg and "cap, plm, ptm" in msg


def test_built_ins_get_their_options(pool):
    plugins = PluginSet.from_names("cap,ptm,plm", experts=pool, alpha=7, lam=3, tau=0.2)
    cap, ptm, plm = plugins.plugins()
    assert isinstance(cap, CapacityMatching) and cap.alpha == 7
    assert isinstance(ptm, PseudoTrajectoryMatching) and ptm.lam == 3
    assert isinstance(plm, PseudoLabelMatching) and plm.tau == 0.2
    assert plugins.names == ["cap", "ptm", "plm"]


def test_ptm_without_experts_is_a_clear_error():
    with pytest.raises(PluginError, match="needs an expert pool"):
        PluginSet.from_names("ptm")


def test_registering_twice_is_an_error():
    cap = CapacityMatching()
    plugins = PluginSet([cap])
    with pytest.raises(PluginError, match="already registered"):
        plugins.register(cap)
    with pytest.raises(PluginError, match="already registered"):
        plugins.register(CapacityMatching())   # same name "cap"
    assert len(plugins) == 1


def test_third_party_plugin_through_entry_point(tmp_path, monkeypatch):
    (tmp_path / "third_party_keep_first.py").write_text(textwrap.dedent('''
        import torch
        from dm_plugins import hookimpl

        class KeepFirst:
            def __init__(self, count=1):
                self.count = count

            @hookimpl
            def dm_select_real(self, real_features):
                keep = torch.zeros(real_features.shape[0], dtype=torch.bool)
                keep[: self.count] = True
                return keep
    '''))
    dist = tmp_path / "third_party_keep_first-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: third-party-keep-first\n"
                                   "Version: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[dm_plugins]\nkeepfirst = third_party_keep_first:KeepFirst\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins = PluginSet.from_names("keepfirst,cap", count=2)
    assert plugins.names == ["keepfirst", "cap"]
    assert type(plugins.plugins()[0]).__name__ == "KeepFirst"
    plugins.setup(num_classes=1, ipc=1, num_iterations=4, extractor=None, real=None)
    real = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [-1.0, 0.0], [0.5, 0.5]])
    # cap at t=0 (typical mode) keeps s > s_min: all but row 3; keepfirst keeps rows 0-1
    mask = plugins.keep_mask(0, real, torch.tensor([[1.0, 0.0]]), 0)
    assert mask.tolist() == [True, True, False, False, False]


def _counting(cls, method, calls, key):
    orig = getattr(cls, method)

    @functools.wraps(orig)
    def wrapper(self, *args, **kwargs):
        calls[key] += 1
        return orig(self, *args, **kwargs)
    return wrapper


HOOKS = {"cap": (CapacityMatching, "dm_select_real"),
         "ptm": (PseudoTrajectoryMatching, "dm_provide_extractor"),
         "plm": (PseudoLabelMatching, "dm_auxiliary_loss")}


@pytest.mark.parametrize("subset", [c for r in range(4) for c in itertools.combinations(
    ["cap", "ptm", "plm"], r)], ids=lambda s: ",".join(s) or "none")
def test_toggling_runs_exactly_the_chosen_hooks(subset, pool, toy, tiny_factory, monkeypatch):
    calls = {name: 0 for name in HOOKS}
    for name, (cls, method) in HOOKS.items():
        monkeypatch.setattr(cls, method, _counting(cls, method, calls, name))
    plugins = PluginSet.from_names(",".join(subset) or "none", experts=pool)
    syn = torch.cat([toy.sample(c, 2, torch.Generator().manual_seed(c)) for c in range(3)])
    host = DMHost(toy, tiny_factory, syn, num_iterations=2, plugins=plugins, batch_real=4)
    metrics = [host.step() for _ in range(2)]
    host.close()
    assert {n for n, k in calls.items() if k} == set(subset)
    if "cap" in subset:
        assert calls["cap"] == 2 * 3       # once per class per iteration
    if "ptm" in subset:
        assert calls["ptm"] == 2
    assert ("loss_plm" in metrics[-1]) == ("plm" in subset)
