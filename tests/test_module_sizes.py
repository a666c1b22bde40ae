"""Small modules with one job: no module of the library or of the harness is over 450 lines (a
module that grows past it is a sign that it holds two jobs; split it by job)."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 450
MODULES = sorted(p for folder in ("dm_plugins", "baselines") for p in (ROOT / folder).rglob("*.py"))


def test_the_modules_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in MODULES}
    assert {"dm_plugins/loop.py", "baselines/harness/driver.py", "baselines/dm.py"} <= names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_module_is_over_the_limit(path):
    lines = len(path.read_text().splitlines())
    assert lines <= LIMIT, f"{path.relative_to(ROOT)} has {lines} lines (limit {LIMIT})"
