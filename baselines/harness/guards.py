"""Guards around a distillation run: stop requests from SIGINT/SIGTERM handled at an iteration
boundary, and the checks that stop or warn about a diverging run."""
from __future__ import annotations

import contextlib
import math
import signal
import threading

import torch

__all__ = ["NonFiniteLoss", "StopRequest", "refuse_non_finite", "warn_if_saturated"]


class NonFiniteLoss(Exception):
    """A loss went NaN or infinite: the run stops before saving that state (exit 2)."""


class StopRequest:
    """SIGINT / SIGTERM handling for one run.

    The first signal during distillation asks the loop to stop at the end of the current
    iteration: the driver writes a checkpoint there and exits (130 for SIGINT, 143 for
    SIGTERM). A second signal, or one outside distillation (data, experts, evaluation), stops at
    once; the last checkpoint on disk is kept.
    """

    def __init__(self):
        self.signum: int | None = None
        self.in_loop = False
        self.run_dir = None          # set once the run directory exists
        self.checkpoint: int | None = None   # iteration of the last checkpoint on disk

    def _handle(self, signum, frame):
        first = self.signum is None
        self.signum = signum if first else self.signum
        if not (self.in_loop and first):
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum or signal.SIGINT)

    def message(self, prog: str, launcher: str = "python") -> str:
        """What to print when the run stops; ``launcher`` starts ``prog`` again (``python``,
        or the torchrun command of a run of several processes)."""
        name = signal.Signals(self.signum or signal.SIGINT).name
        if self.run_dir is None:
            return f"interrupted ({name}) before the run directory was made; nothing was written"
        if self.checkpoint is not None:
            where = f"the checkpoint after {self.checkpoint} iterations is kept"
        elif self.run_dir.checkpoint_path.is_file():  # a resumed run stopped before restoring
            where = "its checkpoint on disk is kept"
        else:
            where = "no checkpoint was written yet, so the run restarts from iteration 0"
        return (f"interrupted ({name}): {where}; continue with: {launcher} {prog} --resume "
                f"{self.run_dir.path}")


_LOSS_PARTS = {"loss_match": "the matching loss", "loss_ce": "the cross-entropy term"}


def refuse_non_finite(t: int, metrics: dict, syn, config: dict, stop: StopRequest) -> None:
    """Stop at the first non-finite loss (naming the part) or non-finite synthetic image,
    before that state is logged or saved."""
    values = {k: v for k, v in metrics.items() if k.startswith("loss")
              and isinstance(v, (int, float)) and not math.isfinite(v)}
    if values:
        parts = [k for k in values if k != "loss"] or ["loss"]
        what = ", ".join(_LOSS_PARTS.get(k, f"plugin {k[5:]!r}'s loss") if k != "loss"
                         else "the loss" for k in parts)
        what = f"{what} became {values[parts[0]]} (non-finite)"
    elif isinstance(syn, torch.Tensor) and not bool(torch.isfinite(syn.detach()).all()):
        what = "the synthetic images became non-finite"
    else:
        return
    kept = (f"the checkpoint after {stop.checkpoint} iterations is kept"
            if stop.checkpoint is not None else "no checkpoint was written before it")
    raise NonFiniteLoss(f"iteration {t}: {what}; {kept}; lower --lr-img (it is "
                        f"{config['lr_img']:g})")


def warn_if_saturated(dataset, stored, config: dict, log, threshold: float = 0.5) -> None:
    """Warn when most synthetic pixels sit at or beyond the valid range [0, 1]: a sign that
    the image learning rate is too high for this run."""
    pixels = dataset.denormalize(stored.detach().cpu().float())
    share = float(((pixels <= 0) | (pixels >= 1)).float().mean())
    if share > threshold:
        log(f"warning: {100 * share:.0f}% of the synthetic pixels are at or beyond the valid "
            f"range [0, 1] (they are clamped when saved); the run may have diverged: lower "
            f"--lr-img (it is {config['lr_img']:g})")
