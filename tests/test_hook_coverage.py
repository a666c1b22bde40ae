"""A plugin whose hook the loop never reached is named once at teardown
(:class:`dm_plugins.manager.HookNeverCalled`), with the PluginSet call to add; our own hosts
(DM, IDM, DANCE) reach every hook of cap, ptm and plm and stay quiet."""
import warnings

import pytest
import torch

from baselines import dance as dance_cli
from baselines import dm as dm_cli
from baselines import idm as idm_cli
from dm_plugins import PluginSet, hookimpl
from dm_plugins.manager import HookNeverCalled


class Filter:
    @hookimpl
    def dm_select_real(self, real_features):
        return None


class Loss:
    @hookimpl
    def dm_auxiliary_loss(self, syn_images):
        return {"loss": syn_images.sum()}


class Features:
    @hookimpl
    def dm_feature_loss(self, syn_features):
        return None


def _set_up(*plugins):
    ps = PluginSet(list(plugins))
    ps.setup(num_classes=1, ipc=1, num_iterations=2)
    return ps


def _never(caught):
    return [str(w.message) for w in caught if issubclass(w.category, HookNeverCalled)]


def test_each_silent_plugin_is_named_once_with_the_call_to_add():
    ps = _set_up(Filter(), Loss(), Features())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(2):
            ps.auxiliary_loss(torch.ones(1, 1, 2, 2), torch.zeros(1, dtype=torch.long), t)
        ps.teardown()
        ps.teardown()                                    # a second teardown: nothing more
    (message,) = _never(caught)
    assert "'Filter' implements dm_select_real" in message and "select_real(c," in message
    assert "'Features' implements dm_feature_loss" in message and "feature_loss(c," in message
    assert "'Loss'" not in message


def test_quiet_when_every_hook_was_reached_or_nothing_ran_or_the_run_failed():
    real, syn = torch.randn(3, 2), torch.randn(1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", HookNeverCalled)
        ps = _set_up(Filter(), Features())
        ps.select_real(0, real, syn, 0)
        ps.feature_loss(0, real, syn, 0)
        ps.teardown()
        _set_up(Filter()).teardown()                     # no iteration ran (resumed at its end)
        ps = _set_up(Filter())
        with pytest.raises(KeyboardInterrupt):
            try:
                ps.extractor(0, fallback=torch.nn.Identity())
                raise KeyboardInterrupt                  # stopped inside its first iteration
            finally:
                ps.teardown()
        ps = _set_up(Filter())                           # a new run forgets the last one's calls
        ps.select_real(0, real, syn, 0)
        ps.teardown()
        ps.setup(num_classes=1, ipc=1, num_iterations=2)
        ps.extractor(0, fallback=torch.nn.Identity())
        with pytest.raises(HookNeverCalled, match="'Filter'"):
            ps.teardown()


BASE = ["--iterations", "2", "--batch-real", "8", "--eval-runs", "0", "--num-experts", "2",
        "--expert-epochs", "1", "--checkpoint-every", "2", "--no-progress", "--device", "cpu",
        "--plugins", "cap,ptm,plm"]
HOSTS = {"dm": (dm_cli, ["--ipc", "2"]),
         "idm": (idm_cli, ["--ipc", "1", "--trained-bs", "8", "--model-train-steps", "1"]),
         "dance": (dance_cli, ["--ipc", "1"])}


@pytest.mark.parametrize("method", list(HOSTS))
def test_our_hosts_reach_every_hook_of_cap_ptm_plm(method, tmp_path, random_experts,
                                                   hook_calls):
    cli, own = HOSTS[method]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(BASE + own + ["--out", str(tmp_path / "run")]) == 0
    assert _never(caught) == []
    assert all(hook_calls.values()), hook_calls
