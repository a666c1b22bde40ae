"""What `pip install .` puts into site-packages: the library only, never the repository's
generic top-level `baselines` / `adapters` packages."""
import runpy
from pathlib import Path

import setuptools

ROOT = Path(__file__).resolve().parents[1]


def test_only_dm_plugins_is_installed(monkeypatch):
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"))
    packages = captured["packages"]
    assert "dm_plugins" in packages
    assert {p.split(".")[0] for p in packages} == {"dm_plugins"}
