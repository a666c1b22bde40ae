"""The layout of the hosts: DMHost, IDM and DANCE build on the one module of shared synthetic-set
pieces (``dm_plugins/synthetic.py``), and the method room (``baselines/methods/``) knows nothing
of the research harness (``baselines/harness/``)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import dm_plugins.loop as dm_host
import dm_plugins.synthetic as synthetic
from baselines.methods import dance, idm

ROOT = Path(__file__).resolve().parents[1]
METHODS = ROOT / "baselines" / "methods"
SHARED = ["run_iterations", "check_host_args", "shard_classes", "check_batch_independent",
          "sum_over_shards", "with_real_kept", "image_step", "synthetic_state",
          "restore_synthetic"]
# the shared pieces each host module uses (DMHost steps with its own single image step)
USES = {
    dm_host: ["run_iterations", "check_host_args", "shard_classes", "check_batch_independent",
              "sum_over_shards", "with_real_kept", "synthetic_state", "restore_synthetic"],
    idm: ["run_iterations", "check_host_args", "shard_classes", "check_batch_independent",
          "sum_over_shards", "image_step", "synthetic_state", "restore_synthetic"],
    dance: ["run_iterations", "check_host_args", "shard_classes", "sum_over_shards",
            "with_real_kept", "image_step", "synthetic_state", "restore_synthetic"],
}


def test_the_shared_module_holds_every_piece():
    assert sorted(synthetic.__all__) == sorted(SHARED)
    for name in SHARED:
        assert getattr(synthetic, name).__module__ == "dm_plugins.synthetic", name


@pytest.mark.parametrize("host", list(USES), ids=lambda m: m.__name__)
def test_every_host_uses_the_one_shared_module(host):
    for name in USES[host]:
        assert getattr(host, name) is getattr(synthetic, name), f"{host.__name__}.{name}"
    # and defines no piece of its own under a shared name
    defined = {node.name for node in ast.parse(Path(host.__file__).read_text()).body
               if isinstance(node, ast.FunctionDef)}
    assert not defined & set(SHARED), host.__name__


def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (lazy imports in functions included),
    relative imports resolved against ``baselines.methods``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = ["baselines", "methods"][:3 - node.level]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_the_method_room_imports_no_harness_module():
    files = sorted(METHODS.glob("*.py"))
    assert {p.name for p in files} >= {"__init__.py", "idm.py", "idm_queue.py", "dance.py",
                                       "coresets.py"}
    for path in files:
        harness = {m for m in _imported_modules(path)
                   if m == "baselines.harness" or m.startswith("baselines.harness.")}
        assert not harness, f"{path.name} imports {sorted(harness)}"
    # and importing every method module loads none (nothing reaches it indirectly)
    names = ", ".join(f"baselines.methods.{p.stem}" for p in files if p.stem != "__init__")
    code = (f"import sys, {names}\n"
            "bad = sorted(m for m in sys.modules if m.startswith('baselines.harness'))\n"
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_method_module_is_left_in_the_harness():
    harness = ROOT / "baselines" / "harness"
    for name in ("idm.py", "idm_queue.py", "dance.py", "coresets.py"):
        assert not (harness / name).exists(), name
