"""baselines/report.py on run directories built by hand, the plots, and the driver's curves.png."""
import json
import re

import pytest
import torch
from PIL import Image

from baselines import report
from baselines.harness import plots
from baselines.harness.synset import save_synset


def _grid(path, shade):
    Image.new("L", (24, 40), color=shade).save(path)


def _distillation_run(path, *, plugins, results=None, plm=True):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({
        "method": "dm", "preset": "ptlm", "plugins": plugins, "ipc": 10, "iterations": 3,
        "dataset": "digits"}))
    lines = [json.dumps({"iteration": t, "loss": 10.0 - t, "loss_match": 9.0 - t,
                         **({"loss_plm": 1.0 / (t + 1)} if plm else {}),
                         "real_kept": 1.0 - 0.1 * t, "seconds": 0.5}) for t in range(3)]
    (path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"iteration": 3, "lo')  # torn
    if results is not None:
        (path / "results.json").write_text(json.dumps(results))
    _grid(path / "grid.png", 80)


def _coreset_output(path):
    path.mkdir(parents=True)
    save_synset(path / "synthetic.pt", torch.rand(4, 1, 8, 8), torch.tensor([0, 0, 1, 1]), {
        "dataset": "digits", "mean": [0.5], "std": [0.5], "ipc": 2, "factor": 1,
        "method": "coreset-herding", "plugins": [], "seed": 0,
        "config": {"method": "herding", "ipc": 2, "expert_test_accuracy": [91.5]}})
    (path / "evaluation.json").write_text(json.dumps({"results": {
        "resnet10": {"accuracy_mean": 30.0, "accuracy_std": 0.0, "accuracies": [30.0]},
        "convnet": {"accuracy_mean": 40.0, "accuracy_std": 2.0, "accuracies": [38.0, 42.0, 40.0]},
    }}))
    _grid(path / "grid.png", 200)


@pytest.fixture()
def runs(tmp_path):
    root = tmp_path / "runs"
    _distillation_run(root / "ptlm", plugins=["cap", "ptm", "plm"], results={
        "accuracy_mean": 50.0, "accuracy_std": 1.0, "accuracies": [49.0, 51.0],
        "expert_test_accuracy": [60.0, 66.0]})
    _distillation_run(root / "none", plugins=[], plm=False)          # not evaluated yet
    _coreset_output(root / "herding")
    return [root / "ptlm", root / "none", root / "herding"]


def _table(text):
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header, separator, *rows = [[c.strip() for c in line.strip("|").split("|")]
                                for line in lines]
    assert all(re.fullmatch(r"-+:?", c) for c in separator) and len(separator) == len(header)
    return header, rows


def _is_png(path):
    assert path.stat().st_size > 0
    with Image.open(path) as image:
        image.verify()
        return image.format == "PNG"


def test_report_table_and_plots(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert report.main([*map(str, runs), "--out", str(out)]) == 0
    header, rows = _table((out / "report.md").read_text())
    assert header == list(report.COLUMNS)
    assert rows == [
        ["ptlm", "dm", "cap,ptm,plm", "ptlm", "10", "3", "50.00 ± 1.00", "2",
         "63.00 (60.0, 66.0)"],
        ["none", "dm", "none", "ptlm", "10", "3", "-", "0", "-"],
        ["herding", "coreset-herding", "none", "-", "2", "-", "40.00 ± 2.00", "3",
         "91.50 (91.5)"]]
    for name in ("curves.png", "grids.png"):
        assert _is_png(out / name)
    assert "| ptlm | dm |" in capsys.readouterr().out
    # a second call rewrites the report (it is derived, never a run)
    assert report.main([str(runs[2]), "--out", str(out)]) == 0
    assert len(_table((out / "report.md").read_text())[1]) == 1


def test_curve_keys_and_metrics_reading(runs):
    records = plots.read_metrics(runs[0] / "metrics.jsonl")
    assert [r["iteration"] for r in records] == [0, 1, 2]      # the torn line is skipped
    assert plots.curve_keys(records) == ["loss", "loss_match", "loss_plm", "real_kept"]
    assert plots.read_metrics(runs[2] / "metrics.jsonl") == []


def test_curves_without_any_metrics_still_make_an_image(tmp_path):
    plots.plot_curves([("a", [])], tmp_path / "c.png")
    assert _is_png(tmp_path / "c.png")


def test_report_refusals(runs, tmp_path, capsys):
    def refused(argv, fragment):
        assert report.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and fragment in err, err
    refused([str(tmp_path), "--out", str(tmp_path / "r")], "not a run directory")
    refused([str(runs[0]), "--out", str(runs[1])], "is a run directory")
    (tmp_path / "file").write_text("x")
    refused([str(runs[0]), "--out", str(tmp_path / "file")], "is a file")
    assert not (tmp_path / "r").exists()
    assert not (runs[1] / "curves.png").exists()


def test_driver_writes_curves_and_never_fails_on_a_plot_error(runs, monkeypatch):
    from baselines.harness.driver import write_curves
    from baselines.harness.runs import RunDir
    messages = []
    run = RunDir(runs[0])
    write_curves(run, messages.append)
    assert _is_png(run.curves_path) and messages == [f"wrote {run.curves_path}"]

    def broken(*args, **kwargs):
        raise RuntimeError("no display")
    monkeypatch.setattr(plots, "plot_curves", broken)
    run = RunDir(runs[1])
    write_curves(run, messages.append)                          # warns, does not raise
    assert messages[-1].startswith("warning: could not write") and "no display" in messages[-1]
    assert not run.curves_path.exists()
    assert not [p for p in run.path.iterdir() if p.name.endswith(".tmp")]


def test_report_plots_accuracy_against_iterations_one_line_per_subset(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    for name, plugins, iterations, acc in [("none-50", [], 50, 47.0), ("cap-50", ["cap"], 50, 44.0),
                                           ("none-150", [], 150, 48.0),
                                           ("cap-150", ["cap"], 150, 47.5)]:
        _distillation_run(root / name, plugins=plugins, results={
            "accuracy_mean": acc, "accuracy_std": 0.5, "accuracies": [acc - 0.5, acc + 0.5],
            "expert_test_accuracy": [60.0 + iterations / 10]})
        config = json.loads((root / name / "config.json").read_text())
        (root / name / "config.json").write_text(json.dumps({**config, "iterations": iterations}))
    seen = {}
    monkeypatch.setattr(plots, "plot_accuracy_vs",
                        lambda series, xlabel, path: seen.update(series=series, xlabel=xlabel)
                        or plots.save_figure(plots.pyplot().figure(), path))
    paths = [str(root / n) for n in ("none-50", "cap-50", "none-150", "cap-150")]
    out = tmp_path / "report"
    assert report.main([*paths, "--vs", "iterations", "--out", str(out)]) == 0
    assert seen["xlabel"] == "iterations"
    assert {k: sorted(v) for k, v in seen["series"].items()} == {
        "none": [(50.0, 47.0, 0.5), (150.0, 48.0, 0.5)],
        "cap": [(50.0, 44.0, 0.5), (150.0, 47.5, 0.5)]}
    assert _is_png(out / "accuracy_vs_iterations.png")
    assert report.main([*paths, "--vs", "expert_accuracy", "--out", str(out)]) == 0
    assert sorted(seen["series"]["cap"]) == [(65.0, 44.0, 0.5), (75.0, 47.5, 0.5)]


def test_accuracy_vs_plot_is_an_image(tmp_path):
    plots.plot_accuracy_vs({"none": [(150, 48.0, 0.5), (50, 47.0, 0.3)], "cap": [(50, 44.0, 0.1)]},
                           "iterations", tmp_path / "a.png")
    assert _is_png(tmp_path / "a.png")


def test_report_vs_refusals(runs, tmp_path, capsys):
    def refused(argv, fragment):
        assert report.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and fragment in err, err
    refused([str(runs[0]), "--vs", "dataset", "--out", str(tmp_path / "r")], "no numeric 'dataset'")
    refused([str(runs[0]), str(runs[1]), "--vs", "iterations", "--out", str(tmp_path / "r")],
            "no evaluation")
    refused([str(runs[0]), str(runs[2]), "--vs", "iterations", "--out", str(tmp_path / "r")],
            "no numeric 'iterations'")
    assert not (tmp_path / "r").exists()


def test_bar_limits_zoom_onto_close_values():
    # values 49.4 +- 0.3 .. 50.9 +- 0.5: spread 49.1..51.4 = 2.3; half below, a third above
    low, high = plots.zoomed_limits([50.9, 49.4, float("nan")], [0.5, 0.3, 0.0])
    assert low == pytest.approx(49.1 - 2.3 / 2) and high == pytest.approx(51.4 + 2.3 / 3)
    low, high = plots.zoomed_limits([3.0, 3.0], [0.0, 0.0])      # one unit at least, never < 0
    assert (low, high) == (pytest.approx(2.5), pytest.approx(3.0 + 1 / 3))
    assert plots.zoomed_limits([0.2], [0.0])[0] == 0.0
    assert plots.zoomed_limits([float("nan")], [0.0]) is None


def test_bars_with_a_reference_line_are_an_image(tmp_path):
    path = tmp_path / "b.png"
    plots.plot_bars(["none", "cap"], {"convnet": ([50.0, 49.0], [0.5, 0.2])}, path,
                    reference="none")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
