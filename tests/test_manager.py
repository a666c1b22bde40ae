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
    from dm_plugins import available_plugins
    assert "'bogus'" in msg and f"available: {', '.join(available_plugins())} (or" in msg
    assert {"cap", "plm", "ptm"} <= set(available_plugins())


def test_built_ins_get_their_options(pool):
    plugins = PluginSet.from_names("cap,ptm,plm", experts=pool,
                                   options={"cap": {"alpha": 7}, "ptm": {"lam": 3},
                                            "plm": {"tau": 0.2}})
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


# -- contract v2: combination rules and argument validation --------------------------------
from dm_plugins import DistillContext, hookimpl  # noqa: E402


class OwnNet:
    name = "ownnet"

    def __init__(self, net):
        self.net = net

    @hookimpl
    def dm_provide_extractor(self, iteration):
        return self.net


class ConstantLoss:
    def __init__(self, name, value):
        self.name, self.value = name, value

    @hookimpl
    def dm_auxiliary_loss(self, syn_images):
        return {self.name: self.value * syn_images.sum()}


def test_a_second_extractor_provider_is_refused_naming_both(pool):
    plugins = PluginSet.from_names("ptm", experts=pool)
    with pytest.raises(PluginError, match="'ptm' and 'ownnet' both provide"):
        plugins.register(OwnNet(torch.nn.Linear(1, 1)))
    assert plugins.names == ["ptm"]                 # the refused plugin is not half-registered


def test_extractor_uses_the_provider_else_the_fallback():
    own, fresh = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    plugins = PluginSet()
    plugins.setup(num_classes=2, ipc=1, num_iterations=3)
    assert plugins.extractor(0, fallback=own) is own
    assert plugins.extractor(1, fallback=lambda: fresh) is fresh
    with pytest.raises(PluginError, match="fallback"):
        plugins.extractor(2)
    provided = PluginSet([OwnNet(own)])
    provided.setup(num_classes=2, ipc=1, num_iterations=3)
    built = []
    assert provided.extractor(0, fallback=lambda: built.append(1)) is own
    assert built == []                              # the fallback is not even built


def test_auxiliary_losses_of_two_plugins_are_summed_by_name():
    plugins = PluginSet([ConstantLoss("a", 2.0), ConstantLoss("b", 3.0)])
    plugins.setup(num_classes=1, ipc=1, num_iterations=2)
    x = torch.ones(2, 1, 1, 1)
    parts = plugins.auxiliary_losses(x, torch.zeros(2, dtype=torch.long), 0)
    assert {k: float(v) for k, v in parts.items()} == {"a": 4.0, "b": 6.0}
    assert float(plugins.auxiliary_loss(x, torch.zeros(2, dtype=torch.long), 0)) == 10.0
    twice = PluginSet([ConstantLoss("a", 1.0)])
    twice.register(ConstantLoss("a", 1.0), name="other")
    twice.setup(num_classes=1, ipc=1, num_iterations=2)
    with pytest.raises(PluginError, match="named 'a'"):
        twice.auxiliary_loss(x, torch.zeros(2, dtype=torch.long), 0)


def test_iterations_and_features_are_validated_in_the_librarys_terms():
    plugins = PluginSet([CapacityMatching()])
    with pytest.raises(PluginError, match="setup"):
        plugins.keep_mask(0, torch.ones(2, 2), torch.ones(1, 2), 0)
    plugins.setup(num_classes=1, ipc=1, num_iterations=5)
    for bad in (-1, 2.0, True):
        with pytest.raises(PluginError, match=r"outside 0\.\.4") as info:
            plugins.keep_mask(0, torch.ones(2, 2), torch.ones(1, 2), bad)
        assert "--" not in str(info.value)          # no command-line vocabulary
    with pytest.raises(PluginError, match="dimensions"):
        plugins.keep_mask(0, torch.ones(2, 3), torch.ones(1, 2), 0)
    with pytest.raises(PluginError, match="empty"):
        plugins.select_real(0, torch.ones(0, 2), torch.ones(1, 2), 0)


def test_an_iteration_past_the_end_warns_once_and_holds_the_schedule_at_its_end(pool):
    """The original DM loop runs ``Iteration + 1`` iterations: the extra one must not raise
    after the run's work is done."""
    from dm_plugins.manager import PastTheEnd
    recorded = []

    class Recorder:
        @hookimpl
        def dm_select_real(self, iteration, num_iterations):
            recorded.append((iteration, num_iterations))

    plugins = PluginSet([Recorder(), PseudoTrajectoryMatching(pool)])
    plugins.setup(num_classes=1, ipc=1, num_iterations=4)
    with pytest.warns(PastTheEnd, match="past num_iterations=4"):
        plugins.keep_mask(0, torch.ones(2, 2), torch.ones(1, 2), 4)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # once per run
        plugins.keep_mask(0, torch.ones(2, 2), torch.ones(1, 2), 9)
        net = plugins.extractor(7)
    assert recorded == [(4, 4), (4, 4)]
    theta_init, theta_star = pool.parameter_pair(pool.pick(4))   # r = 1: the trained weights
    for p, star in zip(net.parameters(), theta_star):
        torch.testing.assert_close(p, star)


def test_keep_mask_is_always_a_mask_and_select_real_always_returns_features():
    plugins = PluginSet()
    plugins.setup(num_classes=1, ipc=1, num_iterations=2)
    real = torch.randn(4, 3)
    assert plugins.keep_mask(0, real, real[:1], 1).tolist() == [True] * 4
    assert plugins.select_real(0, real, real[:1], 1) is real


def test_context_fields_are_optional_but_validated(pool, toy):
    assert DistillContext(num_classes=2, ipc=1, num_iterations=3).real is None
    with pytest.raises(PluginError, match="num_classes"):
        DistillContext(num_classes=0, ipc=1, num_iterations=3)
    with pytest.raises(PluginError, match="DistillContext.real"):
        PluginSet.from_names("plm", experts=pool).setup(num_classes=3, ipc=1, num_iterations=3)
    PluginSet.from_names("cap,ptm", experts=pool).setup(num_classes=3, ipc=1, num_iterations=3)


def test_built_in_names_are_stated_once_by_the_classes():
    from dm_plugins.manager import builtin_plugins
    assert builtin_plugins() == {"cap": CapacityMatching, "ptm": PseudoTrajectoryMatching,
                                 "plm": PseudoLabelMatching}
    assert [cls.needs_experts for cls in builtin_plugins().values()] == [False, True, True]
