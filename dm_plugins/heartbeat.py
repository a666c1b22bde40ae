"""Plain progress lines for runs whose progress bars are off (``--no-progress``, or stderr not a
terminal, as on a cluster): one line to stdout and ``run.log`` every few steps, with the step,
the numbers that matter, seconds per step, elapsed time and an ETA. One implementation for
distillation, expert training and evaluation, on every command line."""
from __future__ import annotations

import sys
import time
from typing import Callable


def bars_wanted(no_progress: bool, stream=None) -> bool:
    """Progress bars only on a terminal: ``--no-progress`` or a redirected stderr turns them off
    (tqdm would write carriage-return updates into the log file) and heartbeat lines on."""
    stream = sys.stderr if stream is None else stream
    return not no_progress and bool(getattr(stream, "isatty", lambda: False)())


def clock(seconds: float) -> str:
    """``1h02m03s`` / ``2m03s`` / ``3s``."""
    seconds = int(round(max(seconds, 0.0)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Heartbeat:
    """``beat(done, **numbers)`` logs ``<what> done/total: k v, ...; s/<unit>, elapsed, ETA`` when
    ``done`` is a multiple of ``every``, the first step or the last. ``start`` is how many steps
    were done before this process began (a resumed run), so the rate counts only its own."""

    def __init__(self, log: Callable[[str], None], what: str, total: int, every: int = 1,
                 start: int = 0, unit: str = "it"):
        self.log, self.what, self.total = log, what, int(total)
        self.every, self.start, self.unit = max(1, int(every)), int(start), unit
        self.began = time.perf_counter()

    def __call__(self, done: int, **numbers) -> None:
        if not (done % self.every == 0 or done == self.total or done == self.start + 1):
            return
        elapsed = time.perf_counter() - self.began
        rate = elapsed / max(done - self.start, 1)
        parts = ", ".join(f"{k} {_number(v)}" for k, v in numbers.items())
        self.log(f"{self.what} {done}/{self.total}" + (f": {parts}" if parts else "")
                 + f"; {rate:.2f} s/{self.unit}, elapsed {clock(elapsed)}, "
                 f"ETA {clock(rate * (self.total - done))}")
