"""baselines/ablate.py: cells, resume, refusals, and one tiny real ablation on digits."""
import csv
import json
import shutil
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from baselines import ablate
from baselines.harness.common import UsageError
from dm_plugins import PluginError

TINY = ["--ipc", "1", "--iterations", "2", "--batch-real", "8", "--eval-runs", "2",
        "--eval-epochs", "1", "--num-experts", "1", "--expert-epochs", "1", "--device", "cpu",
        "--log-every", "1"]


@pytest.fixture(autouse=True)
def _cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DM_PLUGINS_EXPERTS", str(tmp_path / "experts"))


def test_every_subset_in_a_fixed_order():
    assert ablate.expand_subsets(["cap", "ptm", "plm"]) == [
        [], ["cap"], ["ptm"], ["plm"], ["cap", "ptm"], ["cap", "plm"], ["ptm", "plm"],
        ["cap", "ptm", "plm"]]
    assert ablate.expand_subsets([]) == [[]]
    assert [ablate.subset_name(s) for s in ablate.expand_subsets(["plm", "cap"])] == [
        "none", "plm", "cap", "plm+cap"]


def test_explicit_subsets_and_seeds():
    assert ablate.parse_subsets("none;cap; cap,ptm ;PLM") == [[], ["cap"], ["cap", "ptm"],
                                                              ["plm"]]
    with pytest.raises(UsageError, match="empty entry"):
        ablate.parse_subsets("none;;cap")
    with pytest.raises(UsageError, match="twice"):
        ablate.parse_subsets("cap,ptm;ptm,cap")
    with pytest.raises(PluginError, match="bogus"):
        ablate.parse_subsets("cap;bogus")
    assert ablate.parse_seeds("0, 1,2") == [0, 1, 2]
    for bad, message in (("", "no seed"), ("0,x", "integers"), ("1,1", "twice")):
        with pytest.raises(UsageError, match=message):
            ablate.parse_seeds(bad)


def _fake_runner(calls):
    """A stand-in for run_cell: records the argv and writes the results a run would."""
    def run_cell(method, argv, log_path, env):
        calls.append(argv)
        run_dir = argv[argv.index("--resume") + 1] if "--resume" in argv else \
            argv[argv.index("--out") + 1]
        seed = int(re.search(r"-s(\d+)$", run_dir).group(1))
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "config.json").write_text("{}")      # a run directory, as a run makes
        accuracies = [50.0 + seed, 52.0 + seed]
        (Path(run_dir) / "results.json").write_text(json.dumps({
            "accuracy_mean": sum(accuracies) / 2, "accuracy_std": 1.0, "accuracies": accuracies,
            "arch": "convnet", "per_arch": [{"arch": "convnet", "accuracies": accuracies}]}))
        return 0
    return run_cell


def test_resume_reads_finished_cells_back_and_resumes_started_ones(tmp_path, monkeypatch,
                                                                   capsys):
    calls = []
    monkeypatch.setattr(ablate, "run_cell", _fake_runner(calls))
    out = tmp_path / "abl"
    argv = ["--method", "dm", "--plugins", "cap,plm", "--seeds", "0,1", "--out", str(out), *TINY]
    assert ablate.main(argv) == 0
    assert len(calls) == 8                                   # 4 subsets x 2 seeds
    assert [c[c.index("--plugins") + 1] for c in calls[::2]] == ["none", "cap", "plm",
                                                                 "cap,plm"]
    assert all(c[c.index("--expert-seed") + 1] == "0" for c in calls)   # one pool
    assert "8 cells" in capsys.readouterr().out

    calls.clear()
    assert ablate.main(argv) == 0                            # everything finished: nothing runs
    assert calls == []
    assert "8 of 8 cells already finished" in capsys.readouterr().out

    # a cell with a run directory but no results continues with --resume; a missing one starts
    (out / "cells" / "cap-s1" / "results.json").unlink()
    (out / "cells" / "cap-s1" / "config.json").write_text("{}")
    shutil.rmtree(out / "cells" / "plm-s0")
    assert ablate.main(argv + ["--jobs", "2"]) == 0           # --jobs is not a setting
    assert sorted(calls) == sorted([
        ["--resume", str(out / "cells" / "cap-s1"), "--no-progress"],
        [*TINY, "--expert-seed", "0", "--plugins", "plm", "--seed", "0",
         "--out", str(out / "cells" / "plm-s0"), "--no-progress"]])

    rows = list(csv.DictReader((out / "ablation.csv").open()))
    assert len(rows) == 16 and rows[0] == {"subset": "none", "seed": "0", "arch": "convnet",
                                           "eval_run": "0", "accuracy": "50.0",
                                           "run_dir": "cells/none-s0"}
    table = _md_table(out / "ablation.md")
    assert table == [["none", "51.50 ± 1.12", "4"], ["cap", "51.50 ± 1.12", "4"],
                     ["plm", "51.50 ± 1.12", "4"], ["cap+plm", "51.50 ± 1.12", "4"]]


def test_the_tables_are_written_after_every_finished_cell(tmp_path, monkeypatch):
    calls, seen = [], []
    fake = _fake_runner(calls)
    out = tmp_path / "abl"

    def run_cell(method, argv, log_path, env):
        if calls:  # the second cell starts: the first one is in the tables already
            seen.append(_md_table(out / "ablation.md"))
            seen.append((out / "ablation.md").read_text())
            assert (out / "ablation.png").stat().st_size > 0
        return fake(method, argv, log_path, env)
    monkeypatch.setattr(ablate, "run_cell", run_cell)
    assert ablate.main(["--method", "dm", "--subsets", "none;cap", "--seeds", "0",
                        "--out", str(out), *TINY]) == 0
    assert seen[0] == [["none", "51.00 ± 1.00", "2"], ["cap", "-", "0"]]
    assert "Not finished: cap-s0." in seen[1]
    assert _md_table(out / "ablation.md")[1] == ["cap", "51.00 ± 1.00", "2"]


def test_an_interrupted_ablation_writes_the_tables_of_its_finished_cells(tmp_path, monkeypatch):
    calls = []
    fake = _fake_runner(calls)

    def run_cell(method, argv, log_path, env):
        if calls:
            raise KeyboardInterrupt
        return fake(method, argv, log_path, env)
    monkeypatch.setattr(ablate, "run_cell", run_cell)
    out = tmp_path / "abl"
    assert ablate.main(["--method", "dm", "--subsets", "none;cap", "--seeds", "0",
                        "--out", str(out), *TINY]) == 130
    assert _md_table(out / "ablation.md") == [["none", "51.00 ± 1.00", "2"], ["cap", "-", "0"]]


_SLOW_CELL = """
import os, signal, sys, time
from pathlib import Path
out = Path(sys.argv[sys.argv.index("--out") + 1]); out.mkdir(parents=True)
got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append("TERM"))
signal.signal(signal.SIGINT, lambda s, f: got.append("INT"))
(out / "pid").write_text(str(os.getpid()))
deadline = time.monotonic() + 60       # never outlive a broken test
while not got and time.monotonic() < deadline:
    time.sleep(0.02)
time.sleep(0.3)                         # a signal arriving now would be a second one
(out / "signals").write_text(",".join(got))
sys.exit(143)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_runner_reaches_each_running_cell_once_and_starts_no_other(
        tmp_path, monkeypatch, capsys, signum):
    (tmp_path / "baselines").mkdir()
    (tmp_path / "baselines" / "dm.py").write_text(_SLOW_CELL)
    monkeypatch.setattr(ablate, "ROOT", tmp_path)           # cells run the stand-in above
    out = tmp_path / "abl"
    cells = [out / "cells" / name for name in ("none-s0", "none-s1", "cap-s0", "cap-s1")]

    def send_once_both_started():
        deadline = time.monotonic() + 30
        while not all((c / "pid").is_file() for c in cells[:2]) and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signum)
    # a SIGTERM the runner does not catch lands here instead of ending pytest
    caught = []
    before = signal.signal(signal.SIGTERM, lambda s, f: caught.append(s))
    try:
        threading.Thread(target=send_once_both_started, daemon=True).start()
        code = ablate.main(["--method", "dm", "--subsets", "none;cap", "--seeds", "0,1",
                            "--out", str(out), "--jobs", "2", *TINY])
        restored = signal.getsignal(signal.SIGTERM)
    finally:
        ours = signal.signal(signal.SIGTERM, before)
    assert caught == [] and restored is ours
    assert code == 128 + signum
    name = signal.Signals(signum).name[3:]
    assert [(c / "signals").read_text() for c in cells[:2]] == [name, name]   # once each
    assert not cells[2].exists() and not cells[3].exists()              # never started
    err = capsys.readouterr()
    assert "stopped none-s0 (exit 143)" in err.out and "failed" not in err.out
    assert "rerun the same command to resume" in err.err
    assert _md_table(out / "ablation.md") == [["none", "-", "0"], ["cap", "-", "0"]]


def test_with_jobs_the_first_cell_that_needs_experts_runs_alone_first(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(ablate, "run_cell", _fake_runner(calls))
    out = tmp_path / "abl"
    assert ablate.main(["--method", "dm", "--subsets", "none;ptm;cap", "--seeds", "0,1",
                        "--jobs", "3", "--out", str(out), *TINY]) == 0
    assert calls[0][calls[0].index("--plugins") + 1] == "ptm"
    assert len(calls) == 6


def test_with_the_pool_already_cached_no_cell_waits_for_the_others(tmp_path, monkeypatch):
    from baselines.harness.expert_cache import default_cache_dir
    pool = default_cache_dir("digits", "convnet", 1, 0)  # TINY's pool: 1 expert, 1 epoch
    pool.mkdir(parents=True)
    (pool / "manifest.json").write_text(json.dumps({"num_experts": 1}))
    calls = []
    fake = _fake_runner(calls)
    together = threading.Barrier(2, timeout=10)  # broken unless two cells run at once

    def run_cell(method, argv, log_path, env):
        if len(calls) < 2:
            together.wait()
        return fake(method, argv, log_path, env)
    monkeypatch.setattr(ablate, "run_cell", run_cell)
    assert ablate.main(["--method", "dm", "--subsets", "none;ptm", "--seeds", "0", "--jobs",
                        "2", "--out", str(tmp_path / "abl"), *TINY]) == 0
    assert len(calls) == 2 and not together.broken


def test_the_expert_directory_of_a_config_and_its_finished_count(tmp_path):
    from baselines.harness.expert_cache import (cached_expert_count, default_cache_dir,
                                                experts_directory)
    config = {"dataset": "digits", "arch": "convnet", "expert_epochs": 3, "seed": 4,
              "expert_seed": 7, "expert_recipe": "dance", "experts": None}
    assert experts_directory(config) == default_cache_dir("digits", "convnet", 3, 7, "dance")
    assert experts_directory({**config, "experts": str(tmp_path)}) == tmp_path
    assert cached_expert_count(tmp_path) == 0                       # no manifest
    (tmp_path / "manifest.json").write_text("{not json")
    assert cached_expert_count(tmp_path) == 0
    (tmp_path / "manifest.json").write_text(json.dumps({"num_experts": 3}))
    assert cached_expert_count(tmp_path) == 3


def test_cells_get_threads_split_by_jobs_unless_set(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    monkeypatch.setattr(ablate.os, "cpu_count", lambda: 8)
    env = ablate.cell_env(4)
    assert env["OMP_NUM_THREADS"] == "2" and env["MKL_NUM_THREADS"] == "1"
    assert ablate.cell_env(16)["OMP_NUM_THREADS"] == "1"


def _one_line_error(capsys, argv, *fragments):
    try:
        code = ablate.main(argv)
    except SystemExit as exc:                    # the runner's own parser (argparse) exits
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def test_bad_input_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(ablate, "run_cell", _fake_runner(calls))
    out = tmp_path / "abl"
    base = ["--out", str(out), *TINY]
    _one_line_error(capsys, ["--method", "dm", "--plugins", "cap,bogus", *base], "bogus")
    _one_line_error(capsys, ["--method", "sgd", *base], "--method", "sgd")
    _one_line_error(capsys, ["--method", "dm", "--seeds", "", *base], "--seeds")
    _one_line_error(capsys, ["--method", "dm", "--jobs", "0", *base], "--jobs")
    _one_line_error(capsys, ["--method", "dm", *base, "--seed", "3"], "--seed", "--seeds")
    _one_line_error(capsys, ["--method", "dm", *base, "--resume", str(tmp_path)], "--resume")
    _one_line_error(capsys, ["--method", "dm", *base, "--bogus-flag", "1"], "--bogus-flag")
    _one_line_error(capsys, ["--method", "dm", *base, "--eval-runs", "0"], "--eval-runs")
    _one_line_error(capsys, ["--method", "dm", *base, "--iterations", "0"], "--iterations")
    assert not out.exists() and calls == []

    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _one_line_error(capsys, ["--method", "dm", *base], "not an ablation directory")
    (out / "notes.txt").unlink()
    assert ablate.main(["--method", "dm", "--subsets", "none;cap", *base]) == 0
    _one_line_error(capsys, ["--method", "dm", "--subsets", "none", *base],   # a row dropped
                    "other settings", "subsets")
    _one_line_error(capsys, ["--method", "idm", "--subsets", "none;cap", *base], "method")
    _one_line_error(capsys, ["--method", "dm", "--subsets", "none;cap", *base, "--lr-img",
                             "2"], "args")
    _one_line_error(capsys, ["--method", "dm", "--subsets", "none;cap", "--seeds", "1",
                             *base], "seeds")
    assert len(calls) == 2
    _one_line_error(capsys, ["--method", "dm"], "--out")
    _one_line_error(capsys, ["--status", str(tmp_path / "nowhere")], "ablation.json")
    _one_line_error(capsys, ["--status", str(out), "--iterations", "3"], "no other flag")


def _md_table(path):
    """The first table of ``ablation.md`` (the subsets' accuracies)."""
    text = path.read_text()
    first = text[text.index("\n|"):].split("\n\n")[0]
    lines = [line for line in first.splitlines() if line.startswith("|")]
    header, separator, *rows = [[c.strip() for c in line.strip("|").split("|")]
                                for line in lines]
    assert header[0] == "plugins" and header[1:] == ["convnet accuracy (%)", "n"]
    assert all(re.fullmatch(r"-+:?", c) for c in separator)
    return rows


def test_a_tiny_real_ablation_on_digits(tmp_path, capsys):
    """Two cells, each a real baselines/dm.py subprocess (seconds each)."""
    out = tmp_path / "abl"
    assert ablate.main(["--method", "dm", "--subsets", "none;cap", "--seeds", "0",
                        "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "start none-s0" in printed and "finished cap-s0" in printed
    for cell in ("none-s0", "cap-s0"):
        results = json.loads((out / "cells" / cell / "results.json").read_text())
        assert results["plugins"] == ([] if cell == "none-s0" else ["cap"])
        assert len(results["accuracies"]) == 2
        assert (out / "cells" / cell / "curves.png").stat().st_size > 0
    rows = _md_table(out / "ablation.md")
    assert [r[0] for r in rows] == ["none", "cap"]
    for subset, cell, n in rows:
        mean, std = map(float, cell.split(" ± "))
        assert 0 <= mean <= 100 and std >= 0 and n == "2"
    assert len(list(csv.DictReader((out / "ablation.csv").open()))) == 4
    from PIL import Image
    with Image.open(out / "ablation.png") as image:
        assert image.size[0] > 0
    recorded = json.loads((out / "ablation.json").read_text())
    assert recorded["settings"]["subsets"] == ["none", "cap"]


def test_expert_seed_shares_one_pool_across_run_seeds(tmp_path, monkeypatch, random_experts):
    """--expert-seed keys the pool (cache entry, training); the per-iteration pick keeps the
    run's own seed. Without it the pool's seed is the run seed, as before."""
    from baselines import dm
    from baselines.harness import expert_cache
    from dm_plugins import PluginSet
    stand_in, pool_seeds, pick_seeds = expert_cache.load_or_train_experts, [], []

    def load(*args, seed, **kwargs):
        pool_seeds.append(seed)
        return stand_in(*args, seed=seed, **kwargs)
    original = PluginSet.from_names

    def from_names(names, experts=None, **kwargs):
        pick_seeds.append(experts.seed)
        return original(names, experts=experts, **kwargs)
    monkeypatch.setattr(expert_cache, "load_or_train_experts", load)
    monkeypatch.setattr(PluginSet, "from_names", staticmethod(from_names))
    argv = TINY + ["--plugins", "ptm", "--eval-runs", "0", "--no-progress"]
    assert dm.main(argv + ["--seed", "1", "--expert-seed", "0", "--out", str(tmp_path / "a")]) == 0
    assert dm.main(argv + ["--seed", "2", "--out", str(tmp_path / "b")]) == 0
    assert pool_seeds == [0, 2] and pick_seeds == [1, 2]
    assert json.loads((tmp_path / "a" / "config.json").read_text())["expert_seed"] == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["expert_seed"] == 2


def test_an_ablation_grows_by_seeds_and_subsets_and_keeps_its_cells(tmp_path, monkeypatch,
                                                                    capsys):
    calls = []
    monkeypatch.setattr(ablate, "run_cell", _fake_runner(calls))
    out = tmp_path / "abl"
    base = ["--method", "dm", "--out", str(out), *TINY]
    assert ablate.main([*base, "--subsets", "none", "--seeds", "0,1"]) == 0
    calls.clear()
    assert ablate.main([*base, "--subsets", "none;cap", "--seeds", "0,1,2"]) == 0
    started = sorted(c[c.index("--out") + 1].rsplit("/", 1)[1] for c in calls)
    assert started == ["cap-s0", "cap-s1", "cap-s2", "none-s2"]          # the new cells only
    assert all(c[c.index("--expert-seed") + 1] == "0" for c in calls)    # the same pool
    recorded = json.loads((out / "ablation.json").read_text())["settings"]
    assert recorded["seeds"] == [0, 1, 2] and recorded["subsets"] == ["none", "cap"]
    assert _md_table(out / "ablation.md") == [["none", "52.00 ± 1.29", "6"],
                                              ["cap", "52.00 ± 1.29", "6"]]


def _fake_snapshots(run_dir: Path, seed: int, points: dict, seconds_per_point: float,
                    iteration_seconds: list, iterations: int = 40, eval_every: int = 10):
    """A cell's run directory as a run with --eval-every writes it: config.json, metrics.jsonl
    and, for each evaluated point, iter-<t>.pt then iter-<t>.json ``seconds_per_point`` later
    (by mtime)."""
    (run_dir / "snapshots").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({
        "iterations": iterations, "eval_every": eval_every, "eval_at": [],
        "environment": {"threads": 2}}))
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"iteration": i, "seconds": s}) + "\n"
        for i, s in enumerate(iteration_seconds)) + '{"iteration": 99, "sec')  # a torn line
    for t, accuracies in points.items():
        kept, result = run_dir / "snapshots" / f"iter-{t:06d}.pt", \
            run_dir / "snapshots" / f"iter-{t:06d}.json"
        kept.write_bytes(b"set")
        result.write_text(json.dumps({"iteration": t, "accuracies": accuracies,
                                      "arch": "convnet"}))
        os.utime(kept, (1000.0 + t, 1000.0 + t))
        os.utime(result, (1000.0 + t + seconds_per_point, 1000.0 + t + seconds_per_point))


def test_partial_cells_give_curves_and_what_remains(tmp_path, monkeypatch):
    """Two unfinished cells: curves.csv and the pooled curve by hand; the progress from the
    measured s/iter (median of metrics.jsonl's seconds) and s/point (json mtime - pt mtime)."""
    from baselines.harness.ablation import Cell, best_point, summarize_curves, write_outputs
    out = tmp_path / "abl"
    cells = [Cell((), 0), Cell((), 1), Cell(("cap",), 0)]
    _fake_snapshots(cells[0].run_dir(out), 0, {0: [10.0, 12.0], 10: [20.0, 22.0]}, 30.0,
                    [1.0, 3.0, 2.0] + [2.0] * 12)                     # reached iteration 15
    _fake_snapshots(cells[1].run_dir(out), 1, {0: [14.0, 16.0]}, 50.0, [4.0] * 5)
    config = {"iterations": 40, "eval_every": 10, "eval_at": [], "eval_runs": 2,
              "eval_epochs": 1, "eval_protocol": "dm", "eval_arch": ["convnet"],
              "dataset": "digits", "ipc": 1, "preset": None, "expert_seed": 0}
    settings = {"method": "dm", "subsets": ["none", "cap"], "seeds": [0, 1], "args": []}
    write_outputs(out, settings, config, cells)

    rows = list(csv.DictReader((out / "curves.csv").open()))
    assert [(r["seed"], r["iteration"], r["accuracy"]) for r in rows] == [
        ("0", "0", "10.0"), ("0", "0", "12.0"), ("0", "10", "20.0"), ("0", "10", "22.0"),
        ("1", "0", "14.0"), ("1", "0", "16.0")]
    points = summarize_curves([{**r, "seed": int(r["seed"]), "iteration": int(r["iteration"]),
                                "accuracy": float(r["accuracy"])} for r in rows],
                              ["none", "cap"])["convnet"]
    assert points["none"][0] == (0, 13.0, pytest.approx(5 ** 0.5), 4, 2)  # 10,12,14,16
    assert points["none"][1] == (10, 21.0, 1.0, 2, 1) and points["cap"] == []
    text = (out / "ablation.md").read_text()
    assert "| 0 | 13.00 ± 2.24 (4) | - |" in text and "| 10 | 21.00 ± 1.00 (2) | - |" in text
    assert "| 10 | 21.00 | - | - |" in text                               # each cell's mean
    assert (out / "curves.png").stat().st_size > 0

    # none-s0: 40 - 15 = 25 iterations at 2.0 s, 5 - 2 = 3 points at 30 s, x2 threads;
    # none-s1: 35 at 4.0 s, 4 points at 50 s, x2; cap-s0 borrows the medians (3.0 s, 40 s),
    # 40 iterations and 5 points, at the others' 2 threads
    hours = [(25 * 2.0 + 3 * 30) * 2 / 3600, (35 * 4.0 + 4 * 50) * 2 / 3600,
             (40 * 3.0 + 5 * 40) * 2 / 3600]
    assert "| none-s0 | stopped | 15/40 | 2/5 | 2.00 | 30 | " \
           f"{hours[0]:.1f} |" in text
    assert "| none-s1 | stopped | 5/40 | 1/5 | 4.00 | 50 |" in text
    assert "| cap-s0 | not started | 0/? | 0/? | - | - |" in text
    assert f"Remaining: 3 of 3 cells, 100 iterations, 12 snapshot evaluations, about " \
           f"{sum(hours):.1f} CPU-hours" in text

    # the study's T: the first point within 0.5 of the best, among points all seeds reached
    curve = [(0, 20.0, 0, 4, 2), (250, 25.1, 0, 4, 2), (500, 25.5, 0, 4, 2),
             (750, 25.0, 0, 4, 2), (1000, 30.0, 0, 2, 1)]
    assert best_point(curve) == (curve[2], curve[1])
    assert best_point(curve, near=0.3) == (curve[2], curve[2])
    assert best_point([]) == (None, None)


def test_status_reads_a_running_ablation_and_starts_nothing(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(ablate, "run_cell", _fake_runner(calls))
    out = tmp_path / "abl"
    assert ablate.main(["--method", "dm", "--subsets", "none", "--seeds", "0,1",
                        "--out", str(out), *TINY, "--eval-every", "1"]) == 0
    shutil.rmtree(out / "cells" / "none-s1")
    (out / "cells" / "none-s0" / "config.json").write_text(json.dumps(  # as a run writes it
        {"iterations": 2, "eval_every": 1, "environment": {"threads": 1}}))
    (out / "ablation.md").unlink()
    calls.clear()
    capsys.readouterr()
    assert ablate.main(["--status", str(out)]) == 0
    printed = capsys.readouterr().out
    assert calls == [] and not (out / "cells" / "none-s1").exists()
    assert "## Progress" in printed and "| none-s0 | finished | 2/2 |" in printed
    assert "| none-s1 | not started |" in printed and "Remaining: 1 of 2 cells" in printed
    assert "Not finished: none-s1." in (out / "ablation.md").read_text()
