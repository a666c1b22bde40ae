#!/usr/bin/env python
"""Mutation testing of the method code with mutmut (configured in setup.cfg, section [mutmut]).

Not part of CI (too slow). Typical use, from the repository root:

    python tools/mutation.py                   # every module, one after another (resumable)
    python tools/mutation.py seeding capacity  # some modules (short names or paths;
                                               # methods/dance, adapters/dance where stems clash)
    python tools/mutation.py --retest loop     # also re-run survivors/timeouts (after new tests)
    python tools/mutation.py --report          # the per-module table from stored results only
    python tools/mutation.py --survivors dsa   # each surviving mutant: line and diff

Each module runs in its own process, single-threaded (OMP/MKL/torch: 1 thread, one mutant at a
time). mutmut copies the sources into mutants/ and, per mutant, runs only the tests that call the
mutated function; results are stored per mutant in mutants/**/*.meta, so an interrupted run
resumes where it stopped (rerun the same command). `rm -rf mutants` starts from scratch.
Score = (killed + timeout) / mutants; "no tests" mutants count as not killed.
`python -m mutmut show <mutant name>` prints one mutant's whole diff (names as --survivors prints
them, e.g. dm_plugins.capacity.x_capacity_mode__mutmut_1).

Two additions to mutmut 3.8.1 (pinned in setup.py's dev extra), applied by this script only, so
always run mutmut through it: functions with a pluggy ``@hookimpl``, ``@property``,
``@torch.inference_mode()`` or ``@contextmanager`` decorator are mutated too (mutmut skips every
decorated function), and functions that run while a shared (session/module/class-scoped) fixture
is built are credited to every test using that fixture (mutmut credits only the first one).
"""
from __future__ import annotations

import argparse
import ast
import configparser
import contextlib
import datetime
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def _setting(section: str, key: str) -> list[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg.get(section, key, fallback="").split()


MODULES = _setting("mutmut", "only_mutate")
"""The modules mutated, in the order a full run takes them: setup.cfg's ``[mutmut] only_mutate``
(one list for mutmut and this script; ``[mutation] not_mutated`` holds the others)."""
RUN_LOG = ROOT / "mutants" / "mutation-runs.json"
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                 "TORCHINDUCTOR_COMPILE_THREADS": "1"}
# mutmut's exit-code classes (mutmut.stats.status_by_exit_code), grouped for the table
KILLED, SURVIVED, TIMEOUT, NO_TESTS, NOT_CHECKED = "killed", "survived", "timeout", "no tests", "not checked"


def short_name(path: str) -> str:
    """A module's name on the command line: its stem (``capacity``), or ``folder/stem`` where two
    modules share the stem (``methods/dance``, ``adapters/dance``)."""
    stem = Path(path).stem
    if sum(Path(m).stem == stem for m in MODULES) == 1:
        return stem
    return f"{Path(path).parent.name}/{stem}"


def resolve_module(name: str) -> str:
    """`capacity`, `dm_plugins.capacity`, `dm_plugins/augment.py`, `methods/dance`, ... -> the
    path in MODULES."""
    key = name.replace(".py", "").replace(".", "/").strip("/")
    hits = [m for m in MODULES if m[:-3] == key or m[:-3].endswith("/" + key)]
    if len(hits) != 1:
        what = "ambiguous" if hits else "unknown"
        raise SystemExit(f"{what} module {name!r}; one of: "
                         + ", ".join(short_name(m) for m in (hits or MODULES)))
    return hits[0]


def module_name(path: str) -> str:
    return path[:-3].replace("/", ".")


def load_results(path: str) -> dict:
    meta = ROOT / "mutants" / (path + ".meta")
    if not meta.exists():
        return {}
    return json.loads(meta.read_text())["exit_code_by_key"]


def classify(code) -> str:
    from mutmut.stats import status_by_exit_code
    return status_by_exit_code[code]


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


# -- mutating decorated functions -------------------------------------------------------------------
# mutmut 3 leaves every decorated function alone (copying a decorator onto each mutant's copy can
# have side effects). That would skip the plugins' pluggy hook implementations (@hookimpl), the
# Eq. 7-8 pseudo-labels (@torch.inference_mode()), properties and a context manager: the method
# code this run is for. These decorators are safe when only the trampoline (the function the
# class/module exposes) carries them and the original/mutant copies are left bare.
SAFE_DECORATORS = {"hookimpl", "property", "contextlib.contextmanager", "contextmanager",
                   "torch.inference_mode()", "torch.no_grad()"}
MUTMUT_VERSION = "3.8.1"  # the patch below uses mutmut internals: pinned in setup.py's dev extra


def allow_safe_decorators() -> None:
    import libcst as cst
    import mutmut
    from libcst.metadata import PositionProvider
    from mutmut.mutation import file_mutation as fm

    if getattr(mutmut, "__version__", None) != MUTMUT_VERSION:
        raise SystemExit(f"tools/mutation.py needs mutmut=={MUTMUT_VERSION} "
                         f"(found {getattr(mutmut, '__version__', '?')}): pip install -e '.[dev]'")
    empty = cst.Module([])

    def safe(node) -> bool:
        return (isinstance(node, cst.FunctionDef) and bool(node.decorators)
                and all(empty.code_for_node(d.decorator) in SAFE_DECORATORS
                        for d in node.decorators))

    skip = fm.MutationVisitor._skip_node_and_children

    def skip_unless_safe(self, node):
        if not safe(node):
            return skip(self, node)
        pos = self.get_metadata(PositionProvider, node, None)  # honour `# pragma: no mutate`
        if pos and pos.start.line in self._ignored_node_lines:
            return skip(self, node)
        return node.name.value in fm.NEVER_MUTATE_FUNCTION_NAMES

    arrange = fm.function_trampoline_arrangement

    def arrange_with_bare_copies(function, mutants, class_name):
        if not safe(function):
            return arrange(function, mutants, class_name)
        decls, methods, assigns, names = arrange(function.with_changes(decorators=[]), mutants,
                                                 class_name)
        methods = list(methods)  # [trampoline, original copy, mutants...]: decorate the first only
        methods[0] = methods[0].with_changes(decorators=[*function.decorators,
                                                         *methods[0].decorators])
        return decls, methods, assigns, names

    fm.MutationVisitor._skip_node_and_children = skip_unless_safe
    fm.function_trampoline_arrangement = arrange_with_bare_copies


# -- crediting shared fixtures ----------------------------------------------------------------------
def credit_shared_fixtures() -> None:
    """mutmut maps each function to the tests during which it ran. A function that runs while a
    session-, module- or class-scoped fixture is built (the trained expert ``pool`` of
    tests/conftest.py, say) is then credited only to the first test that uses the fixture, and
    the later tests that check what the fixture built are never run against its mutants. Credit
    such functions to every test that uses the fixture (applied while mutmut collects stats)."""
    from collections import defaultdict

    import pytest
    from mutmut.mutation import trampoline
    from mutmut.runners.harness import PytestRunner
    from mutmut.state import state
    from mutmut.utils.format_utils import strip_prefix

    building: list = []             # the shared fixtures being set up right now (nested)
    hits: dict = defaultdict(set)   # (baseid, name) of a fixture -> functions run to build it
    record = trampoline.record_trampoline_hit

    def record_and_credit(name, caller=None):
        record(name, caller=caller)
        for key in building:
            hits[key].add(name)

    class SharedFixtureCredit:
        @pytest.hookimpl(wrapper=True)
        def pytest_fixture_setup(self, fixturedef, request):
            shared = fixturedef.scope != "function"
            if shared:
                building.append((fixturedef.baseid, fixturedef.argname))
            try:
                return (yield)
            finally:
                if shared:
                    building.pop()

        def pytest_sessionfinish(self, session):
            tests = state().tests_by_mangled_function_name
            for item in session.items:
                info = getattr(item, "_fixtureinfo", None)
                for name in getattr(item, "fixturenames", ()):
                    defs = info.name2fixturedefs.get(name) if info is not None else None
                    for func in hits.get((defs[-1].baseid, name), ()) if defs else ():
                        tests[func].add(strip_prefix(item.nodeid, prefix="mutants/"))

    execute = PytestRunner.execute_pytest

    def execute_with_credit(self, params, **kwargs):
        plugins = kwargs.get("plugins") or []
        if any(type(p).__name__ == "StatsCollector" for p in plugins):  # mutmut's stats run
            kwargs["plugins"] = [*plugins, SharedFixtureCredit()]
        return execute(self, params, **kwargs)

    trampoline.record_trampoline_hit = record_and_credit
    PytestRunner.execute_pytest = execute_with_credit


# -- running one module (in a child process) --------------------------------------------------------
def excluded_tests() -> list[str]:
    """setup.cfg [mutation] exclude_tests: test files (or node-id prefixes) never run on mutants."""
    return _setting("mutation", "exclude_tests")


def _drop_excluded_tests(module: str, excluded: list[str]) -> None:
    """Remove excluded tests from this module's test-to-function map, in memory only (mutmut's
    stats file keeps every association, so `--all-tests` can bring them back)."""
    from mutmut.state import state
    tests = state().tests_by_mangled_function_name
    for func in list(tests):
        if func.startswith(module + "."):
            tests[func] = {t for t in tests[func] if not t.startswith(tuple(excluded))}


def run_one(path: str, retest: bool, all_tests: bool) -> int:
    """Generate mutants (a no-op when up to date), then test this module's unresolved mutants."""
    import torch  # noqa: F401  (imported before mutmut forks, pinned to one thread)
    torch.set_num_threads(1)
    import mutmut.__main__ as mm
    from mutmut.__main__ import _run, create_mutants
    from mutmut.utils.file_utils import copy_also_copy_files, copy_src_dir

    excluded = [] if all_tests else excluded_tests()
    if excluded:
        load = mm.collect_or_load_stats

        def load_then_filter(*args, **kwargs):
            load(*args, **kwargs)
            _drop_excluded_tests(module_name(path), excluded)
        mm.collect_or_load_stats = load_then_filter

    allow_safe_decorators()
    credit_shared_fixtures()
    Path("mutants").mkdir(exist_ok=True)
    with contextlib.redirect_stdout(io.StringIO()):  # mutmut lists every file it copies
        copy_src_dir()
        copy_also_copy_files()
        create_mutants(1)

    rerun = {NOT_CHECKED} | ({SURVIVED, TIMEOUT, NO_TESTS, "suspicious", "segfault"} if retest else set())
    names = [k for k, code in load_results(path).items() if classify(code) in rerun]
    if not names:
        print(f"{path}: nothing left to test")
        return 0
    print(f"{path}: testing {len(names)} mutants")
    _run(names, max_children=1)
    return 0


def snapshot(path: str) -> dict:
    """What a module's run tests against: the commit, plus uncommitted changes to tests/ and it."""
    return {"commit": git("rev-parse", "HEAD"), "tests_status": git("status", "--short", "tests/"),
            "source_status": git("status", "--short", path),
            "started": datetime.datetime.now().isoformat(timespec="seconds")}


def record_run(path: str, snap: dict, rc: int) -> None:
    log = json.loads(RUN_LOG.read_text()) if RUN_LOG.exists() else {}
    log[path] = {**snap, "finished": datetime.datetime.now().isoformat(timespec="seconds"),
                 "returncode": rc}
    RUN_LOG.write_text(json.dumps(log, indent=2))


# -- reporting ---------------------------------------------------------------------------------------
def table(paths: list[str]) -> str:
    log = json.loads(RUN_LOG.read_text()) if RUN_LOG.exists() else {}
    rows = [("module", "mutants", "killed", "survived", "timeout", "no tests", "unchecked", "score %",
             "commit")]
    totals = [0] * 6
    for path in paths:
        counts = {KILLED: 0, SURVIVED: 0, TIMEOUT: 0, NO_TESTS: 0, NOT_CHECKED: 0}
        results = load_results(path)
        for code in results.values():
            status = classify(code)
            counts[status if status in counts else SURVIVED] += 1  # suspicious/segfault: not killed
        n = len(results)
        checked = n - counts[NOT_CHECKED]
        score = f"{100 * (counts[KILLED] + counts[TIMEOUT]) / checked:.1f}" if checked else "-"
        row = [n, counts[KILLED], counts[SURVIVED], counts[TIMEOUT], counts[NO_TESTS],
               counts[NOT_CHECKED]]
        totals = [a + b for a, b in zip(totals, row)]
        commit = log.get(path, {}).get("commit", "")[:10]
        rows.append((path, *map(str, row), score, commit))
    checked = totals[0] - totals[5]
    rows.append(("total", *map(str, totals),
                 f"{100 * (totals[1] + totals[3]) / checked:.1f}" if checked else "-", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def tested_source(path: str) -> str:
    """The source a module's mutants were made from: the commit its run recorded when the file was
    clean then (the working tree may have moved on since), else the working-tree file."""
    log = json.loads(RUN_LOG.read_text()) if RUN_LOG.exists() else {}
    run = log.get(path, {})
    if run.get("commit") and not run.get("source_status"):
        shown = subprocess.run(["git", "show", f"{run['commit']}:{path}"], cwd=ROOT,
                               capture_output=True, text=True)
        if shown.returncode == 0:
            return shown.stdout
    return (ROOT / path).read_text()


def _def_line(path: str, func: str, cls: str | None) -> int:
    """Line of the ``def`` of the original function in the source file."""
    tree = ast.parse(tested_source(path))
    body = tree.body
    if cls is not None:
        body = next(n.body for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    return next(n.lineno for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                and n.name == func)


def describe_mutant(path: str, key: str) -> tuple[int, list[str]]:
    """(line in the source file, ["- original line", "+ mutated line", ...]) of one mutant."""
    import difflib

    import libcst as cst
    from mutmut.mutation.diff_apply import (read_functions_from_index, read_mutant_function,
                                            read_mutants_module, read_original_function)
    from mutmut.utils.format_utils import orig_function_and_class_names_from_key

    funcs = read_functions_from_index(key, path)
    if funcs is None:
        module = read_mutants_module(path)
        funcs = read_original_function(module, key), read_mutant_function(module, key)
    orig, mutant = (cst.Module([f]).code.strip().split("\n") for f in funcs)
    def_idx = next(i for i, ln in enumerate(orig) if re.match(r"(async\s+)?def\s", ln))
    func, cls = orig_function_and_class_names_from_key(key)
    first, changes = None, []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, orig, mutant).get_opcodes():
        if tag == "equal":
            continue
        first = i1 if first is None else first
        changes += ["- " + ln.strip() for ln in orig[i1:i2]] + ["+ " + ln.strip() for ln in mutant[j1:j2]]
    return _def_line(path, func, cls) + (first or 0) - def_idx, changes


def survivors(paths: list[str]) -> str:
    """Every mutant not killed (nor timed out), by module and line."""
    out = []
    for path in paths:
        rows = []
        for key, code in load_results(path).items():
            status = classify(code)
            if status in (KILLED, TIMEOUT, NOT_CHECKED):
                continue
            line, changes = describe_mutant(path, key)
            rows.append((line, key, status, changes))  # key: for `mutmut show`
        for line, name, status, changes in sorted(rows, key=lambda r: (r[0], r[1])):
            out.append(f"{path}:{line}  [{status}]  {name}")
            out.extend("    " + c for c in changes)
    return "\n".join(out) if out else "no survivors"


# -- command line --------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="modules: " + ", ".join(short_name(m) for m in MODULES))
    p.add_argument("modules", nargs="*", help="modules to run (default: all)")
    p.add_argument("--retest", action="store_true",
                   help="also re-run survived / timeout / no-tests mutants (after tests changed)")
    p.add_argument("--all-tests", action="store_true",
                   help="ignore setup.cfg [mutation] exclude_tests (e.g. with --retest)")
    p.add_argument("--report", action="store_true", help="print the table only; run nothing")
    p.add_argument("--survivors", action="store_true",
                   help="list every mutant not killed: file:line, status, diff")
    p.add_argument("--_one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.chdir(ROOT)
    os.environ.update(SINGLE_THREAD)
    if args._one:
        return run_one(args._one, args.retest, args.all_tests)

    paths = [resolve_module(m) for m in args.modules] or MODULES
    if args.survivors:
        print(survivors(paths))
        return 0
    if not args.report:
        print(f"commit {git('rev-parse', 'HEAD')}; tests/ changes: "
              f"{git('status', '--short', 'tests/') or 'none'}", flush=True)
        for path in paths:
            snap = snapshot(path)
            print(f"== {path} ({snap['started']})", flush=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--_one", path]
            cmd += ["--retest"] * args.retest + ["--all-tests"] * args.all_tests
            rc = subprocess.run(cmd, cwd=ROOT).returncode
            (ROOT / "mutants").mkdir(exist_ok=True)
            record_run(path, snap, rc)
            if rc:
                print(f"!! {path}: mutmut exited with {rc}", flush=True)
    print(table(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
