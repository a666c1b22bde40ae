"""Per-stage wall time of an iteration, for benchmarks (``benchmarks/iteration_cost.py``)."""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch


class StageTimer:
    """``with timer("real_forward"): ...`` adds the block's wall time to ``timer.seconds``.

    Disabled (``enabled=False``), a call is a no-op context: no clock, no synchronisation, so
    hosts can keep the ``with`` blocks in their hot path. Enabled on CUDA, each block
    synchronises the device before and after it, so the time is the block's own (this slows an
    iteration slightly: only benchmarks enable it).
    """

    def __init__(self, device: str | torch.device = "cpu", enabled: bool = True):
        self.device = torch.device(device)
        self.enabled = bool(enabled)
        self.seconds: dict[str, float] = defaultdict(float)

    def __call__(self, name: str):
        return self._timed(name) if self.enabled else nullcontext()

    @contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset(self) -> None:
        self.seconds.clear()
