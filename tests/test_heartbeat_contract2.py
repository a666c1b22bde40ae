"""Small formatting functions at their boundaries (not only on round inputs): the heartbeat's
``clock`` (``1h02m03s`` / ``2m03s`` / ``3s``, whole seconds), its numbers (``.4g``) and its
line (``s/<unit>`` with two decimals, elapsed, ETA), the study progress table (s/iter with two
decimals, s/point with none, CPU-hours with one, ``-`` when unknown) and MiB figures (one
decimal)."""
import pytest

from baselines.harness.paths import mib
from baselines.harness.study_progress import CellProgress, progress_markdown, remaining
from dm_plugins import heartbeat
from dm_plugins.heartbeat import Heartbeat, clock


@pytest.mark.parametrize("seconds,text", [
    (0, "0s"), (0.4, "0s"), (0.6, "1s"), (-3, "0s"), (-0.6, "0s"),
    (59.4, "59s"), (59.6, "1m00s"), (60, "1m00s"), (61, "1m01s"), (119.6, "2m00s"),
    (599.6, "10m00s"), (3599.4, "59m59s"), (3599.5, "1h00m00s"), (3599.6, "1h00m00s"),
    (3600, "1h00m00s"), (3660.6, "1h01m01s"), (36000, "10h00m00s"),
    (90061, "25h01m01s"),                      # no days: hours keep counting
])
def test_clock_rounds_to_whole_seconds_before_splitting(seconds, text):
    # catches: splitting before rounding ("59m60s", "60s"), truncating instead of rounding
    # (0.6 s -> "0s"), or unpadded minutes/seconds after the first unit
    assert clock(seconds) == text


@pytest.mark.parametrize("value,text", [
    (1.23456, "1.235"), (0.6, "0.6"), (59.6, "59.6"), (0.000123456, "0.0001235"),
    (123456.0, "1.235e+05"), (1e-5, "1e-05"), (12345, "12345"), (0, "0"), (True, "True"),
    (float("nan"), "nan"),
])
def test_heartbeat_numbers_are_four_significant_digits_for_floats_only(value, text):
    # catches: ints formatted as floats ("1.234e+04"), or a fixed number of decimals
    assert heartbeat._number(value) == text


def _beats(monkeypatch, step_seconds, total, every=1, start=0, unit="it"):
    now = [1000.0]
    monkeypatch.setattr(heartbeat.time, "perf_counter", lambda: now[0])
    lines = []
    beat = Heartbeat(lines.append, "distill", total=total, every=every, start=start, unit=unit)
    for done in range(start + 1, total + 1):
        now[0] += step_seconds
        beat(done)
    return lines


def test_heartbeat_line_at_0_6_seconds_a_step(monkeypatch):
    # catches: ETA from the steps done instead of the steps left, or rate over all steps
    lines = _beats(monkeypatch, 0.6, total=100, every=50)
    assert lines == ["distill 1/100; 0.60 s/it, elapsed 1s, ETA 59s",      # 0.6 s, 59.4 s
                     "distill 50/100; 0.60 s/it, elapsed 30s, ETA 30s",
                     "distill 100/100; 0.60 s/it, elapsed 1m00s, ETA 0s"]


def test_heartbeat_line_near_an_hour_and_a_resumed_start(monkeypatch):
    # catches: the rate counting the steps done before a resume, or every=0 dividing by zero
    lines = _beats(monkeypatch, 359.96, total=12, every=0, start=2, unit="epoch")
    assert len(lines) == 10                            # every < 1 logs every step
    assert lines[0] == "distill 3/12; 359.96 s/epoch, elapsed 6m00s, ETA 54m00s"  # 3239.64 s
    assert lines[-1] == "distill 12/12; 359.96 s/epoch, elapsed 1h00m00s, ETA 0s"   # 3599.6 s


def test_heartbeat_logs_the_first_own_step_every_multiple_and_the_last(monkeypatch):
    # catches: the first line of a resumed run lost, or the last step skipped off a multiple
    lines = _beats(monkeypatch, 1.0, total=11, every=5, start=3)
    assert [line.split(";")[0] for line in lines] == ["distill 4/11", "distill 5/11",
                                                      "distill 10/11", "distill 11/11"]


def _cell(name, state="running", **kw):
    values = dict(reached=0, iterations=100, evaluated=0, points=2, seconds_per_iteration=None,
                  seconds_per_point=None, threads=1)
    values.update(kw)
    return CellProgress(name, state, **values)


def test_progress_table_rounds_each_column_at_its_boundary():
    # catches: a column with the wrong number of decimals, or hours not divided by 3600
    cells = [_cell("a", reached=90, seconds_per_iteration=359.95, seconds_per_point=0.6,
                   evaluated=2),
             _cell("b", reached=10, seconds_per_iteration=0.004, seconds_per_point=59.6,
                   evaluated=1),
             _cell("c", state="finished", reached=100, seconds_per_iteration=0.5,
                   seconds_per_point=0.4, evaluated=2)]
    rows = remaining(cells, iterations=100, points=2, threads=1)
    hours = [r[3] for r in rows]
    assert hours[0] == pytest.approx(10 * 359.95 / 3600)             # 3599.5 s: 0.99986 h
    assert hours[1] == pytest.approx((90 * 0.004 + 59.6) / 3600) and hours[2] == 0.0
    table = progress_markdown(rows)
    assert "| a | running | 90/100 | 2/2 | 359.95 | 1 | 1.0 |" in table
    assert "| b | running | 10/100 | 1/2 | 0.00 | 60 | 0.0 |" in table
    assert "| c | finished | 100/100 | 2/2 | 0.50 | 0 | 0.0 |" in table
    assert "about 1.0 CPU-hours" in table              # 0.99986 + 0.01666 = 1.0165


def test_progress_table_unknown_values_are_dashes_and_the_total_unknown():
    # catches: None formatted as a number (a TypeError), or a total summed over unknowns
    cells = [_cell("a"), _cell("b", iterations=None, points=0)]
    rows = remaining(cells, iterations=50, points=3, threads=4)
    assert [r[1:] for r in rows] == [(100, 2, None), (50, 3, None)]
    table = progress_markdown(rows)
    assert "| a | running | 0/100 | 0/2 | - | - | - |" in table
    assert "| b | running | 0/? | 0/? | - | - | - |" in table
    assert "about unknown CPU-hours" in table


@pytest.mark.parametrize("n,text", [(0, "0.0 MiB"), (52428, "0.0 MiB"), (52429, "0.1 MiB"),
                                    ((1 << 20) - 1, "1.0 MiB"), (3 << 19, "1.5 MiB"),
                                    (1 << 30, "1024.0 MiB")])
def test_mib_has_one_decimal(n, text):
    # catches: MB (10^6) instead of MiB, or a truncation instead of rounding
    assert mib(n) == text
