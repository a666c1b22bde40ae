"""Capacity matching, Eq. 2-4, against hand-computed masks and a naive implementation."""
import math

import pytest
import torch

from dm_plugins import CapacityMatching, DistillContext, PluginSet, hookimpl
from dm_plugins.capacity import capacity_keep_mask, capacity_mode

# z_syn = (1, 0); real features at angles with cosines 1, 0.5, 0, -0.5
# -> s = [1, .5, 0, -.5], s_min = -.5, s_max = 1, s_mean = .25
SYN = torch.tensor([[2.0, 1.0], [2.0, -1.0]])          # mean (2, 0) -> direction (1, 0)
REAL = torch.tensor([[3.0, 0.0],
                     [0.5, math.sqrt(3) / 2],
                     [0.0, 4.0],
                     [-0.5, math.sqrt(3) / 2]])


@pytest.mark.parametrize("t,expected", [
    (0, [1, 1, 1, 0]),   # threshold s_min = -0.5
    (2, [1, 1, 1, 0]),   # -0.5 + 0.5 * 0.75 = -0.125
    (3, [1, 1, 0, 0]),   # -0.5 + 0.75 * 0.75 = 0.0625
])
def test_typical_mode_by_hand(t, expected):
    mask = capacity_keep_mask(REAL, SYN, t, 4, "typical")
    assert mask.tolist() == [bool(e) for e in expected]


@pytest.mark.parametrize("t,expected", [
    (0, [1, 1, 1, 1]),   # threshold s_max = 1
    (2, [0, 1, 1, 1]),   # 1 - 0.5 * 0.75 = 0.625
    (3, [0, 0, 1, 1]),   # 1 - 0.75 * 0.75 = 0.4375
])
def test_diverse_mode_by_hand(t, expected):
    mask = capacity_keep_mask(REAL, SYN, t, 4, "diverse")
    assert mask.tolist() == [bool(e) for e in expected]


def naive_mask(real, syn, t, T, mode):
    z = [sum(col) / len(syn) for col in zip(*syn.tolist())]
    nz = math.sqrt(sum(v * v for v in z))
    s = []
    for row in real.tolist():
        nr = math.sqrt(sum(v * v for v in row))
        s.append(sum(a * b for a, b in zip(row, z)) / (nr * nz))
    lo, hi, mean, p = min(s), max(s), sum(s) / len(s), t / T
    if mode == "typical":
        keep = [v > lo + p * (mean - lo) for v in s]
        best = hi
    else:
        keep = [v <= hi - p * (hi - mean) for v in s]
        best = lo
    return keep if any(keep) else [v == best for v in s]


@pytest.mark.parametrize("mode", ["typical", "diverse"])
@pytest.mark.parametrize("t", [0, 7, 19])
def test_matches_naive_implementation(mode, t):
    g = torch.Generator().manual_seed(t)
    real = torch.randn(33, 6, generator=g, dtype=torch.float64)
    syn = torch.randn(5, 6, generator=g, dtype=torch.float64)
    assert capacity_keep_mask(real, syn, t, 20, mode).tolist() == naive_mask(real, syn, t, 20, mode)


@pytest.mark.parametrize("mode", ["typical", "diverse"])
def test_all_scores_equal_keeps_everything(mode):
    real = torch.tensor([[1.0, 1.0]]).repeat(5, 1) * torch.arange(1, 6).unsqueeze(1)
    syn = torch.tensor([[1.0, 1.0]])
    for t in (0, 5, 9):
        assert capacity_keep_mask(real, syn, t, 10, mode).all()


@pytest.mark.parametrize("mode", ["typical", "diverse"])
@pytest.mark.parametrize("t", [0, 9])
def test_single_sample_batch_is_kept(mode, t):
    mask = capacity_keep_mask(torch.tensor([[0.3, -1.0]]), SYN, t, 10, mode)
    assert mask.tolist() == [True]


def test_never_empty_and_fallback_keeps_best():
    # two samples, typical mode: the lower one never passes s > s_min; at the last iteration
    # the threshold is near s_mean so only the best survives - never nothing.
    real = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    syn = torch.tensor([[1.0, 0.1]])
    for t in range(10):
        mask = capacity_keep_mask(real, syn, t, 10, "typical")
        assert mask.tolist() == [True, False]
        assert capacity_keep_mask(real, syn, t, 10, "diverse")[1]


def test_mode_threshold_alpha():
    assert capacity_mode(10, 50) == "typical"
    assert capacity_mode(50, 50) == "diverse"
    assert CapacityMatching(alpha=5, ipc=5).mode == "diverse"


def test_syn_features_with_graph_are_detached():
    syn = SYN.clone().requires_grad_(True)
    mask = capacity_keep_mask(REAL, syn * 2, 3, 4, "typical")
    assert not mask.requires_grad


class DropLast:
    name = "droplast"

    @hookimpl
    def dm_select_real(self, real_features):
        keep = torch.ones(real_features.shape[0], dtype=torch.bool)
        keep[-1] = False
        return keep


def test_plugin_masks_are_anded_and_empty_and_falls_back():
    plugins = PluginSet([CapacityMatching(alpha=50, ipc=1), DropLast()])
    plugins.setup(DistillContext(num_classes=1, ipc=1, num_iterations=4, extractor=None, real=None))
    # cap at t=3 keeps [1,1,0,0]; droplast keeps [1,1,1,0] -> AND [1,1,0,0]
    assert plugins.keep_mask(0, REAL, SYN, 3).tolist() == [True, True, False, False]
    # a single sample: cap keeps it, droplast drops it -> empty AND -> whole batch
    assert plugins.keep_mask(0, REAL[:1], SYN, 3).tolist() == [True]


# -- pins for mutants that survived the first mutation run -------------------------------------
def test_all_equal_scores_give_a_boolean_all_true_mask():
    mask = capacity_keep_mask(torch.ones(4, 3), torch.ones(2, 3), 2, 4, "typical")
    assert mask.dtype == torch.bool and mask.tolist() == [True] * 4


@pytest.mark.parametrize("mode,best", [("typical", [False, True, False]),
                                       ("diverse", [True, False, False])])
def test_a_rule_that_would_keep_nothing_keeps_the_best(mode, best):
    # p = t/T = 3 overshoots the rule so that it keeps no sample; the fallback keeps the most
    # similar sample (typical) or the least similar one (diverse), never an empty mask
    real = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    syn = torch.tensor([[1.0, 0.0]])
    assert capacity_keep_mask(real, syn, 30, 10, mode).tolist() == best


def test_constructor_defaults_and_messages():
    assert CapacityMatching().alpha == 50
    assert CapacityMatching(alpha=1).alpha == 1
    with pytest.raises(ValueError, match="alpha must be >= 1, got 0"):
        CapacityMatching(alpha=0)
    with pytest.raises(RuntimeError, match=r"^CapacityMatching needs the IPC: call dm_setup "
                                           r"first or pass ipc=$"):
        CapacityMatching().dm_select_real(torch.ones(2, 2), torch.ones(1, 2), 0, 2)
    with pytest.raises(ValueError, match="capacity mode must be 'typical' or 'diverse'"):
        capacity_keep_mask(torch.ones(2, 2), torch.ones(1, 2), 0, 2, "wide")
