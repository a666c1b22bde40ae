"""The registry's and the options' rules (dm_plugins/registry.py, dm_plugins/options.py):

* "the three built-ins, which an entry point cannot override": an entry point reusing a
  built-in name is never loaded, built nor asked for its options; other entry points are
  loaded only when their plugin is requested; the table is sorted by name;
* "each one [option] is also a keyword argument of the class": a factory declaring an option
  its ``__init__`` lacks is refused in one line (the drivers pass every option, defaults
  included, so it would otherwise fail with a TypeError on any run that chooses it);
* option values: a boolean is not a number (``True`` for an ``int`` or ``float`` option is
  refused, on the Python API and in a config), a whole float is an integer, not a finite one
  is refused; a choice is checked before the type.
"""
import math
import re

import pytest

from baselines.harness.common import UsageError
from baselines.harness.plugin_flags import check_plugin_flags, plugin_option_table
from dm_plugins import (CapacityMatching, PluginError, PluginOption, PluginSet,
                        PseudoLabelMatching, registry)
from dm_plugins.options import check_options, declared_options, options_from_config
from dm_plugins.registry import available_plugins, check_plugin_names, plugins_need_experts


class FakeEntryPoint:
    """Stands in for importlib.metadata.EntryPoint; counts its loads."""

    def __init__(self, name, target):
        self.name, self.value, self.target, self.loads = name, f"pkg:{name}", target, 0

    def load(self):
        self.loads += 1
        return self.target


class Impostor:
    """A third-party class that claims a built-in name."""
    name = "cap"
    needs_experts = True
    options = (PluginOption("alpha", str, "x", "not cap's alpha"),)

    def __init__(self, alpha="x"):
        raise AssertionError("an entry point may not replace a built-in")


class Lacks:
    """Declares ``gain`` but its __init__ has no such argument."""
    name = "lacks"
    options = (PluginOption("gain", float, 1.0, "a gain"),)

    def __init__(self, experts=None):
        self.experts = experts


class Positional:
    name = "positional"
    options = (PluginOption("gain", float, 1.0, "a gain"),)

    def __init__(self, gain=1.0, /):
        self.gain = gain


class Takes:
    name = "takes"
    options = (PluginOption("gain", float, 1.0, "a gain"),
               PluginOption("steps", int, 2, "steps", check=lambda v: None if v >= 1
                            else "must be >= 1"))

    def __init__(self, gain=1.0, *, steps=2):
        self.gain, self.steps = gain, steps


class Anything:
    name = "anything"
    options = (PluginOption("gain", float, 1.0, "a gain"),)

    def __init__(self, **kwargs):
        self.kwargs = kwargs


def _with(monkeypatch, **extra):
    """The plugin table plus ``extra`` wherever it is read (registry, manager, package)."""
    import dm_plugins
    from dm_plugins import manager
    real = registry.available_plugins

    def table():
        return dict(sorted({**real(), **extra}.items()))
    for module in (registry, manager, dm_plugins):
        monkeypatch.setattr(module, "available_plugins", table)


def _entry_points(monkeypatch, *eps):
    monkeypatch.setattr(registry, "entry_points",
                        lambda group: list(eps) if group == "dm_plugins" else [])


# -- entry points and built-in names ---------------------------------------------------------
def test_an_entry_point_reusing_a_built_in_name_is_never_loaded_or_built(monkeypatch):
    # catches: the entry points applied after the built-ins (factories.update order swapped)
    impostor = FakeEntryPoint("cap", Impostor)
    other = FakeEntryPoint("zeta", Takes)
    _entry_points(monkeypatch, impostor, other)
    table = available_plugins()
    assert table["cap"] is CapacityMatching and list(table) == sorted(table)
    assert set(table) == {"cap", "ptm", "plm", "zeta"}
    plugins = PluginSet.from_names("cap", options={"cap": {"alpha": 7}})
    assert isinstance(plugins.plugins()[0], CapacityMatching) and plugins.plugins()[0].alpha == 7
    assert plugins_need_experts("cap") is False               # cap's, not the impostor's
    rows = [(p, o.name, o.type) for p, o in plugin_option_table() if p == "cap"]
    assert rows == [("cap", "alpha", int), ("cap", "end", float)]
    assert impostor.loads == 0


def test_entry_points_are_loaded_only_when_their_plugin_is_asked_for(monkeypatch):
    # catches: available_plugins or a name check importing every third-party package
    ep = FakeEntryPoint("takes", Takes)
    _entry_points(monkeypatch, ep)
    assert "takes" in available_plugins()
    assert check_plugin_names("cap,takes") == ["cap", "takes"]
    assert ep.loads == 0
    plugin, = PluginSet.from_names("takes", options={"takes": {"gain": 0.5}}).plugins()
    assert isinstance(plugin, Takes) and plugin.gain == 0.5 and ep.loads >= 1


# -- options a factory declares must be keyword arguments of it -----------------------------
def test_a_factory_declaring_an_option_its_init_lacks_is_refused_in_one_line(monkeypatch):
    # catches: the option passed through to the factory (a TypeError traceback at run time)
    _with(monkeypatch, lacks=Lacks)
    message = re.escape("plugin 'lacks' declares the option 'gain', which Lacks() does not "
                        "take as a keyword argument; add it to the signature or drop the "
                        "option")
    for call in (lambda: declared_options(Lacks),
                 lambda: PluginSet.from_names("lacks", options={"lacks": {"gain": 2.0}}),
                 lambda: PluginSet.from_names("lacks"),       # the drivers pass the defaults
                 lambda: options_from_config("lacks", Lacks, {"lacks_gain": 1.0})):
        with pytest.raises(PluginError, match="^" + message + "$"):
            call()
    # --help still works: the broken plugin contributes no flags, the others theirs
    names = {p for p, _ in plugin_option_table()}
    assert "lacks" not in names and {"cap", "ptm", "plm"} <= names


def test_a_positional_only_argument_is_not_a_keyword_argument():
    # catches: any parameter of that name accepted, whatever its kind
    with pytest.raises(PluginError, match="'gain', which .*Positional\\(\\) does not take"):
        declared_options(Positional)


def test_keyword_only_and_var_keyword_arguments_are_accepted(monkeypatch):
    # catches: keyword-only arguments or **kwargs refused
    assert [o.name for o in declared_options(Takes)] == ["gain", "steps"]
    assert [o.name for o in declared_options(Anything)] == ["gain"]
    for cls in (CapacityMatching, PseudoLabelMatching):
        assert declared_options(cls) == cls.options
    _with(monkeypatch, takes=Takes, anything=Anything)
    assert {"takes", "anything"} <= {p for p, _ in plugin_option_table()}
    takes, anything = PluginSet.from_names(
        "takes,anything", options={"takes": {"steps": 3}, "anything": {"gain": 2.0}}).plugins()
    assert (takes.gain, takes.steps) == (1.0, 3) and anything.kwargs == {"gain": 2.0}


# -- booleans, numbers and choices -------------------------------------------------------------
NUMBER = PluginOption("n", int, 1, "an int")
REAL = PluginOption("x", float, 1.0, "a float")
CHOICE = PluginOption("mode", str, "a", "a choice", choices=("a", "b"))


@pytest.mark.parametrize("option,value,problem", [
    (NUMBER, True, "must be a number"), (NUMBER, False, "must be a number"),
    (REAL, True, "must be a number"), (REAL, False, "must be a number"),
    (NUMBER, "3", "must be a number"), (REAL, "0.5", "must be a number"),
    (REAL, None, "must be a number"),
    (NUMBER, 2.5, "must be an integer"), (NUMBER, 3.0, None), (NUMBER, 0, None),
    (REAL, 3, None), (REAL, -0.0, None),
    (REAL, math.inf, "must be finite"), (REAL, -math.inf, "must be finite"),
    (REAL, math.nan, "must be finite"), (NUMBER, math.nan, "must be finite"),
    (CHOICE, "b", None), (CHOICE, "c", "must be one of a, b"),
    (CHOICE, True, "must be one of a, b"), (CHOICE, 1, "must be one of a, b"),
])
def test_option_values_booleans_are_not_numbers(option, value, problem):
    # catches: isinstance(value, bool) dropped (True is an int in Python), or the finite and
    # integer checks swapped
    assert option.problem(value) == problem


def test_a_boolean_for_a_plugin_option_is_refused_naming_the_flag():
    # catches: a boolean option value reaching the plugin (cap's alpha True would be IPC 1)
    with pytest.raises(PluginError, match=r"^--cap-alpha must be a number, got True$"):
        check_options("cap", CapacityMatching, {"alpha": True})
    with pytest.raises(PluginError, match=r"^--plm-tau must be a number, got False$"):
        PluginSet.from_names("plm", experts=object(), options={"plm": {"tau": False}})
    with pytest.raises(PluginError, match=r"^--cap-end must be a number, got True$"):
        PluginSet.from_names("cap", options={"cap": {"end": True}})
    for key, value in (("cap_alpha", True), ("ptm_lam", False), ("plm_max_real_per_class", 1.5)):
        with pytest.raises(UsageError, match="^--" + key.replace("_", "-") + " must be "):
            check_plugin_flags({key: value})
    check_plugin_flags({"cap_alpha": 3, "cap_end": 1, "ptm_lam": 2})   # 1 for a float: fine


def test_a_check_runs_only_on_a_value_of_the_right_type():
    # catches: the option's own check run first (a TypeError comparing a string with 1)
    assert Takes.options[1].problem("many") == "must be a number"
    assert Takes.options[1].problem(0) == "must be >= 1"
    assert Takes.options[1].problem(1) is None
