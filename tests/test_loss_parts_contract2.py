"""A run's reported ``loss`` is the sum of its ``loss_*`` parts on every host, and each part is
the sum of the per-call losses it is said to sum (the hosts' ``step`` docstrings: DM's total is
matching + auxiliary; IDM's ``loss`` is "summed over classes and passes", ``loss_ce`` the
weighted term; DANCE's ``loss`` is "both views summed over classes" and ``loss_<name>`` "per
inter-class loss (summed over classes and passes)"). Checked with several parts at once (a
feature loss, PLM's loss, IDM's CE), two IDM matching passes and two DANCE calibration passes;
the parts are what ``metrics.jsonl`` records (the harness appends the host's metrics as they
are; ``tests/test_iid_hosts.py`` checks the records of a command-line run)."""
import functools

import pytest
import torch

from adapters.dance import DANCEHost
from adapters.idm import IDMHost
from baselines.methods.dance import DANCE
from baselines.methods.idm import IDM
from dm_plugins import DMHost, PluginSet, PseudoLabelMatching, hookimpl
from tests.conftest import group_scale_augment
from tests.test_dance import make_host as make_dance
from tests.test_idm import make_host as make_idm

C = 3


class Probe:
    """A feature loss: each class's own matching term on the features the host passes (so the
    sum of its calls is the host's matching loss), recorded per call."""

    def __init__(self):
        self.values = []

    @hookimpl
    def dm_feature_loss(self, real_features, syn_features):
        term = ((real_features.mean(0) - syn_features.mean(0)) ** 2).sum()
        self.values.append(float(term.detach()))
        return {"probe": term}


@pytest.fixture()
def plm_values(monkeypatch):
    """Every loss PLM's hook returns during the test, in order."""
    values = []
    orig = PseudoLabelMatching.dm_auxiliary_loss

    @functools.wraps(orig)
    def recorded(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        values.append(float(out["plm"].detach()))
        return out
    monkeypatch.setattr(PseudoLabelMatching, "dm_auxiliary_loss", recorded)
    return values


def parts(metrics):
    return {k: v for k, v in metrics.items() if k.startswith("loss_")}


def plugin_set(spec, pool, probe):
    plugins = [] if spec == "none" else PluginSet.from_names(spec, experts=pool).plugins()
    return PluginSet([probe, *plugins])


SPECS = ["none", "plm", "cap,ptm,plm"]


@pytest.mark.parametrize("spec", SPECS)
def test_dm_loss_is_the_sum_of_its_parts(spec, toy, pool, tiny_factory, plm_values):
    # catches: a feature or auxiliary loss left out of the reported total (or of the step)
    probe = Probe()
    g = torch.Generator().manual_seed(1)
    host = DMHost(toy, tiny_factory, torch.cat([toy.sample(c, 2, g) for c in range(C)]),
                  num_iterations=3, augment=group_scale_augment, batch_real=5, seed=3,
                  plugins=plugin_set(spec, pool, probe))
    for t in range(3):
        del probe.values[:], plm_values[:]
        metrics = host.step(t)
        expected = {"loss_match", "loss_probe"} | ({"loss_plm"} if "plm" in spec else set())
        assert set(parts(metrics)) == expected
        assert metrics["loss"] == pytest.approx(sum(parts(metrics).values()), rel=1e-5)
        assert metrics["loss_probe"] == pytest.approx(sum(probe.values), rel=1e-5)
        assert metrics["loss_probe"] == pytest.approx(metrics["loss_match"], rel=1e-5)
        assert len(probe.values) == C
        if "plm" in spec:
            assert len(plm_values) == 1 and metrics["loss_plm"] == pytest.approx(plm_values[0])
    host.close()


@pytest.mark.parametrize("spec", SPECS)
def test_idm_loss_is_the_sum_of_its_parts_over_classes_and_two_passes(spec, toy, pool,
                                                                      tiny_factory, plm_values,
                                                                      monkeypatch):
    # catches: one pass's or one class's losses dropped from a part or from the total, or the
    # unweighted CE ("ce") summed into the loss instead of the weighted one
    probe = Probe()
    class_parts = []
    orig = IDM.class_loss

    def recorded(self, p, c):
        total, out = orig(self, p, c)
        class_parts.append({k: float(v) if isinstance(v, int) else float(v.detach())
                            for k, v in out.items()})
        return total, out
    monkeypatch.setattr(IDM, "class_loss", recorded)
    host = make_idm(toy, tiny_factory, cls=IDMHost, plugins=plugin_set(spec, pool, probe),
                    train_net_num=2)
    weighted = []
    for t in range(3):
        del probe.values[:], plm_values[:], class_parts[:]
        metrics = host.step(t)
        expected = {"loss_match", "loss_ce", "loss_probe"} | ({"loss_plm"} if "plm" in spec
                                                             else set())
        assert set(parts(metrics)) == expected
        assert metrics["loss"] == pytest.approx(sum(parts(metrics).values()), rel=1e-5)
        assert len(probe.values) == 2 * C                       # every class, both passes
        assert metrics["loss_probe"] == pytest.approx(sum(probe.values), rel=1e-5)
        assert metrics["loss_probe"] == pytest.approx(metrics["loss_match"], rel=1e-5)
        assert len(class_parts) == 2 * C
        for name in ("match", "ce", "ce_raw"):
            key = "ce" if name == "ce_raw" else f"loss_{name}"
            assert metrics[key] == pytest.approx(sum(p[name] for p in class_parts), rel=1e-5)
        weighted.append(metrics["loss_ce"])
        if "plm" in spec:
            assert len(plm_values) == 2 * C
            assert metrics["loss_plm"] == pytest.approx(sum(plm_values), rel=1e-5)
    assert weighted[0] == 0 and max(weighted) > 0     # untrained queue nets at t = 0, then CE
    host.close()


@pytest.mark.parametrize("spec", SPECS)
def test_dance_loss_is_the_sum_of_both_views_over_classes_and_two_passes(spec, toy, pool,
                                                                         monkeypatch,
                                                                         plm_values):
    # catches: an inter-class part that keeps only the last pass or class (= instead of +=), or
    # the inner view's feature losses left out of the total
    probe = Probe()
    ce_values = []
    orig = DANCE.inter_class_losses

    def recorded(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        ce_values.append(float(out["ce"].detach()))
        return out
    monkeypatch.setattr(DANCE, "inter_class_losses", recorded)
    host = make_dance(toy, pool, DANCEHost, plugin_set(spec, pool, probe), iter_calib=2)
    for t in range(2):
        del probe.values[:], plm_values[:], ce_values[:]
        metrics = host.step(t)
        inter = "loss_plm" if "plm" in spec else "loss_ce"
        assert set(parts(metrics)) == {"loss_match", "loss_probe", inter}
        assert metrics["loss"] == pytest.approx(sum(parts(metrics).values()), rel=1e-5)
        assert len(probe.values) == C
        assert metrics["loss_probe"] == pytest.approx(sum(probe.values), rel=1e-5)
        assert metrics["loss_probe"] == pytest.approx(metrics["loss_match"], rel=1e-5)
        calls = plm_values if "plm" in spec else ce_values
        assert len(calls) == 2 * C                              # both passes, every class
        assert metrics[inter] == pytest.approx(sum(calls), rel=1e-5)
    host.close()
