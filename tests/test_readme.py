"""The README's glue example runs as written, and its commands match .ci/run."""
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block_after(marker: str) -> str:
    start = README.index(marker)
    match = re.search(r"```python\n(.*?)```", README[start:], re.S)
    return match.group(1)


def test_glue_example_runs(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                 # the example caches its experts in ./experts-demo
    namespace = {}
    exec(compile(_block_after("<!-- glue-example -->"), "README glue example", "exec"), namespace)
    out = capsys.readouterr().out
    assert "final loss" in out
    assert torch.isfinite(torch.tensor(float(out.split()[-1])))
    assert namespace["plugins"].names == ["cap", "ptm", "plm"]
    assert namespace["syn"].grad is not None
    assert (tmp_path / "experts-demo" / "manifest.json").is_file()


def test_glue_is_at_most_ten_lines():
    code = _block_after("<!-- glue-example -->")
    glue = [line for line in code.splitlines() if "# +" in line]
    continued = sum(1 for a, b in zip(code.splitlines(), code.splitlines()[1:])
                    if "# +" in b and a.rstrip().endswith(",") and "# +" not in a)
    assert 0 < len(glue) + continued <= 11        # ten, and one for dm_feature_loss


def test_ci_runs_the_readme_commands():
    quickstart = re.search(r"## Quickstart.*?```bash\n(.*?)```", README, re.S).group(1)
    install_line, test_line = [line.strip() for line in quickstart.strip().splitlines()]
    install = install_line.split("&&")[0].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert install in ci
    assert test_line in ci
