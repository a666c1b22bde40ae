"""PluginSet's contract beyond the built-ins: entry points (lazy load, needs_experts), default
names, registration errors, repr, the arguments hooks receive, the combination rules on the edge
cases, and the one-line messages (pinned in full)."""
import re

import pytest
import torch

from dm_plugins import CapacityMatching, DistillContext, PluginError, PluginSet, hookimpl
from dm_plugins import registry
from dm_plugins.registry import _LazyEntryPoint, plugins_need_experts


class FakeEntryPoint:
    """Stands in for importlib.metadata.EntryPoint: ``load()`` returns ``target`` or raises it."""

    def __init__(self, name, value, target):
        self.name, self.value, self.target = name, value, target
        self.loads = 0

    def load(self):
        self.loads += 1
        if isinstance(self.target, BaseException):
            raise self.target
        return self.target


class ExpertHungry:
    needs_experts = True

    def __init__(self, experts=None):
        self.experts = experts


class Modest:
    def __init__(self):
        pass


def _fake_entry_points(monkeypatch, *eps):
    def entry_points(group):
        assert group == "dm_plugins"
        return list(eps)
    monkeypatch.setattr(registry, "entry_points", entry_points)


# -- entry points ----------------------------------------------------------------------------------
def test_broken_entry_point_is_a_one_line_plugin_error():
    lazy = _LazyEntryPoint(FakeEntryPoint("x", "pkg:X", ImportError("boom")))
    with pytest.raises(PluginError, match=r"^plugin 'x' \(pkg:X\) failed to import: ImportError: boom$"):
        lazy()
    for attribute in ("needs_experts", "options"):   # asked by the drivers before building it
        with pytest.raises(PluginError, match=r"^plugin 'x' \(pkg:X\) failed to import"):
            getattr(lazy, attribute)


def test_entry_point_needs_experts_reads_the_loaded_class(monkeypatch):
    hungry = FakeEntryPoint("hungry", "pkg:ExpertHungry", ExpertHungry)
    modest = FakeEntryPoint("modest", "pkg:Modest", Modest)
    assert _LazyEntryPoint(hungry).needs_experts is True
    assert _LazyEntryPoint(modest).needs_experts is False
    _fake_entry_points(monkeypatch, hungry, modest)
    assert plugins_need_experts("hungry") is True
    assert plugins_need_experts("modest") is False
    assert plugins_need_experts("modest,cap") is False
    assert plugins_need_experts("modest,plm") is True
    assert plugins_need_experts("none") is False
    # building passes only the accepted options
    assert isinstance(PluginSet.from_names("modest", experts="pool").plugins()[0], Modest)
    assert PluginSet.from_names("hungry", experts="pool").plugins()[0].experts == "pool"


def test_a_factory_without_needs_experts_does_not_need_experts(monkeypatch):
    factories = {"cap": CapacityMatching, "modest": Modest}
    monkeypatch.setattr(registry, "available_plugins", lambda: dict(factories))
    assert plugins_need_experts("modest") is False
    assert plugins_need_experts("cap,modest") is False


# -- registration --------------------------------------------------------------------------------
class Nameless:
    @hookimpl
    def dm_select_real(self, real_features):
        return None


def test_a_plugin_without_name_is_named_after_its_class():
    plugins = PluginSet([Nameless()])
    assert plugins.names == ["Nameless"]
    assert repr(plugins) == "PluginSet(Nameless)"


def test_the_same_object_under_two_names_is_refused():
    cap = CapacityMatching()
    plugins = PluginSet([cap])
    with pytest.raises(PluginError, match=r"^plugin 'again' is already registered; register it once$"):
        plugins.register(cap, name="again")
    assert plugins.names == ["cap"]


def test_a_misspelt_hook_argument_is_refused_with_the_spec_name():
    class Misspelt:
        name = "typo"

        @hookimpl
        def dm_select_real(self, real_featurez):
            return None

    # errors.py: "Every message is one line"; pluggy's own text spans three lines
    with pytest.raises(PluginError, match=r"^plugin 'typo' does not match the dm_plugins hook "
                                          r"specs: [^\n]*'real_featurez'[^\n]*$") as info:
        PluginSet([Misspelt()])
    assert "\n" not in str(info.value)


def test_repr_lists_names_or_none():
    assert repr(PluginSet()) == "PluginSet(none)"
    assert repr(PluginSet.from_names("cap")) == "PluginSet(cap)"
    two = PluginSet([CapacityMatching(), Nameless()])
    assert repr(two) == "PluginSet(cap, Nameless)"


class OwnNet:
    name = "ownnet"

    @hookimpl
    def dm_provide_extractor(self, iteration):
        return torch.nn.Identity()


def test_provides_extractor():
    assert PluginSet([OwnNet()]).provides_extractor is True
    assert PluginSet([CapacityMatching()]).provides_extractor is False
    assert PluginSet().provides_extractor is False


# -- messages ------------------------------------------------------------------------------------
def test_use_before_setup_message():
    with pytest.raises(PluginError, match="^" + re.escape(
            "PluginSet.setup(...) must be called before the loop") + "$"):
        PluginSet().num_iterations


def test_setup_with_context_and_fields_message():
    ctx = DistillContext(num_classes=1, ipc=1, num_iterations=2)
    with pytest.raises(PluginError, match=r"^pass PluginSet.setup either a DistillContext or its "
                                          r"fields, not both$"):
        PluginSet().setup(ctx, ipc=1)


def test_no_extractor_message():
    plugins = PluginSet()
    plugins.setup(num_classes=1, ipc=1, num_iterations=2)
    with pytest.raises(PluginError, match="^" + re.escape(
            "no plugin provides the extractor this iteration and no fallback was given: pass "
            "fallback=your_network (or a function building it)") + "$"):
        plugins.extractor(0)


def test_feature_shape_messages():
    plugins = PluginSet([CapacityMatching()])
    plugins.setup(num_classes=1, ipc=1, num_iterations=2)
    with pytest.raises(PluginError, match="^" + re.escape(
            "features must be (batch, dim) tensors, got real (4, 2, 2) and synthetic (3, 4); "
            "flatten them first") + "$"):
        plugins.keep_mask(0, torch.ones(4, 2, 2), torch.ones(3, 4), 0)
    # either side alone being 3-D is refused
    with pytest.raises(PluginError, match=r"^features must be \(batch, dim\) tensors, got real "
                                          r"\(4, 4\) and synthetic \(3, 2, 2\)"):
        plugins.keep_mask(0, torch.ones(4, 4), torch.ones(3, 2, 2), 0)
    with pytest.raises(PluginError, match=r"^features must be \(batch, dim\) tensors, got real "
                                          r"\(4, 2, 2\) and synthetic \(3, 4\)"):
        plugins.keep_mask(0, torch.ones(4, 2, 2), torch.ones(3, 4), 0)
    with pytest.raises(PluginError, match=r"^real features have 3 dimensions but synthetic "
                                          r"features 2$"):
        plugins.keep_mask(0, torch.ones(4, 3), torch.ones(1, 2), 0)
    with pytest.raises(PluginError, match=r"^a class's real batch is empty: there is nothing to "
                                          r"match$"):
        plugins.keep_mask(0, torch.ones(0, 2), torch.ones(1, 2), 0)


# -- what hooks receive ---------------------------------------------------------------------------
class Recording:
    name = "rec"

    def __init__(self, aux=None):
        self.calls = []
        self.aux = aux

    @hookimpl
    def dm_setup(self, context):
        self.calls.append(("setup", context))

    @hookimpl
    def dm_select_real(self, label, real_features, iteration, num_iterations):
        self.calls.append(("select", label, iteration, num_iterations))
        return torch.ones(real_features.shape[0], dtype=torch.bool)

    @hookimpl
    def dm_auxiliary_loss(self, syn_images, iteration, num_iterations):
        self.calls.append(("aux", iteration, num_iterations))
        return self.aux

    @hookimpl
    def dm_teardown(self, context):
        self.calls.append(("teardown", context))


def test_hooks_receive_label_iteration_num_iterations_and_context():
    rec = Recording(aux={"r": torch.tensor(1.5)})
    plugins = PluginSet([rec])
    ctx = plugins.setup(num_classes=3, ipc=1, num_iterations=7)
    plugins.keep_mask(2, torch.ones(4, 3), torch.ones(1, 3), 5)
    plugins.auxiliary_losses(torch.ones(2, 1, 1, 1), torch.zeros(2, dtype=torch.long), 6)
    plugins.teardown()
    assert rec.calls == [("setup", ctx), ("select", 2, 5, 7), ("aux", 6, 7), ("teardown", ctx)]
    assert rec.calls[-1][1] is ctx


def test_batched_keep_mask_without_filters_is_all_true_and_checks_the_iteration():
    plugins = PluginSet()
    plugins.setup(num_classes=2, ipc=1, num_iterations=3)
    labels = torch.tensor([0, 0, 1, 1, 1])
    keep = plugins.batched_keep_mask(torch.ones(5, 2), labels, torch.ones(2, 2),
                                     torch.tensor([0, 1]), 0)
    assert keep.dtype == torch.bool and keep.tolist() == [True] * 5
    with pytest.raises(PluginError, match=r"^iteration -1 is outside 0\.\.2"):
        plugins.batched_keep_mask(torch.ones(5, 2), labels, torch.ones(2, 2),
                                  torch.tensor([0, 1]), -1)


def test_auxiliary_losses_messages():
    plugins = PluginSet([Recording(aux=[torch.tensor(1.0)])])
    plugins.setup(num_classes=1, ipc=1, num_iterations=2)
    with pytest.raises(PluginError, match=r"^3 synthetic images but 2 labels$"):
        plugins.auxiliary_losses(torch.ones(3, 1, 1, 1), torch.zeros(2, dtype=torch.long), 0)
    with pytest.raises(PluginError, match=r"^dm_auxiliary_loss must return a dict of named losses "
                                          r"or None, got list$"):
        plugins.auxiliary_losses(torch.ones(2, 1, 1, 1), torch.zeros(2, dtype=torch.long), 0)


def test_auxiliary_loss_without_losses_is_float_zero():
    plugins = PluginSet([Recording(aux=None)])
    plugins.setup(num_classes=1, ipc=1, num_iterations=2)
    total = plugins.auxiliary_loss(torch.ones(2, 1, 1, 1), torch.zeros(2, dtype=torch.long), 1)
    assert isinstance(total, float) and total == 0.0
    assert plugins.auxiliary_losses(torch.ones(2, 1, 1, 1), torch.zeros(2, dtype=torch.long), 1) == {}
