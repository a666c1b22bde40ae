"""The mutation-testing settings cover the code (setup.cfg ``[mutmut]`` / ``[mutation]``,
tools/mutation.py; nothing is mutated here): every module of the library, the harness, the
methods and the adapters is either mutated or listed as not mutated, so a module added or split
later must be placed; tools/mutation.py runs exactly setup.cfg's list, each module reachable by
its short name; and mutmut copies every repository path the tests read."""
import configparser
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("dm_plugins", "baselines/harness", "baselines/methods", "adapters")


def _cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def _listed(section, key):
    return _cfg().get(section, key).split()


def _tool():
    spec = importlib.util.spec_from_file_location("mutation_tool", ROOT / "tools" / "mutation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_module_is_mutated_or_listed_as_not_mutated():
    # catches: a new or split module (e.g. named_losses.py, study_progress.py) left out of both
    mutated, skipped = _listed("mutmut", "only_mutate"), _listed("mutation", "not_mutated")
    assert len(set(mutated)) == len(mutated) and len(set(skipped)) == len(skipped)
    assert not set(mutated) & set(skipped)
    modules = {p.relative_to(ROOT).as_posix() for folder in FOLDERS
               for p in (ROOT / folder).rglob("*.py")}
    assert set(mutated) | set(skipped) == modules, (
        sorted(modules - set(mutated) - set(skipped)), sorted(set(mutated) | set(skipped)
                                                              - modules))
    for named in ("dm_plugins/named_losses.py", "dm_plugins/registry.py", "dm_plugins/options.py",
                  "baselines/harness/snapshots.py", "baselines/harness/study_progress.py",
                  "baselines/harness/cpu_threads.py", "baselines/methods/dance.py"):
        assert named in mutated


def test_the_tool_runs_setup_cfgs_modules_each_by_its_short_name():
    # catches: tools/mutation.py keeping a list of its own that drifts from setup.cfg
    tool = _tool()
    mutated = _listed("mutmut", "only_mutate")
    assert tool.MODULES == mutated
    for path in mutated:
        assert tool.resolve_module(tool.short_name(path)) == path
        assert tool.resolve_module(path) == path
    assert tool.excluded_tests() == _listed("mutation", "exclude_tests")


def test_mutmut_copies_every_repository_path_the_tests_read():
    # catches: a test reading ROOT / "configs" (say) that finds nothing in mutants/ and passes
    copied = set(_listed("mutmut", "source_paths")) | set(_listed("mutmut", "also_copy")) | {
        "tests"}
    read = set()
    for test in (ROOT / "tests").glob("*.py"):
        if test.name == Path(__file__).name:       # its own pattern and tools/ (below)
            continue
        read |= set(re.findall(r'ROOT / "([^"/]+)"', test.read_text()))
    assert read, "the pattern finds the tests' reads"
    assert read <= copied, sorted(read - copied)
    assert "tools" in copied                         # this file reads tools/mutation.py
