"""Capacity matching (PTLM paper section 2, Eq. 2-4): plugin ``cap``, a real-sample filter."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .hookspecs import hookimpl
from .options import PluginOption, at_least, in_unit_interval

TYPICAL = "typical"
DIVERSE = "diverse"
TIE_TOLERANCE = 1e-6  # cosine scores closer than this count as equal


def capacity_mode(ipc: int, alpha: int) -> str:
    """``"diverse"`` when IPC >= alpha (large synthetic sets), ``"typical"`` otherwise."""
    return DIVERSE if ipc >= alpha else TYPICAL


def capacity_progress(iteration: int, num_iterations: int, end: float = 1.0) -> float:
    """Eq. 4's progress ``p = end * t / T``.

    ``end = 1`` is the paper's text (``p = t / T``, reaching 1 at the end of the run).
    ``end = 0.5`` is the public code's reading: it uses ``(t // 2) / 10000`` with DANCE's
    ``T = 10,000``, i.e. ``t / (2T)``, so the filter never gets stricter than half way (the
    floor of ``t / 2`` moves ``p`` by at most ``1 / (2T)`` and is not reproduced).
    """
    return end * iteration / num_iterations


def capacity_keep_mask(real_features: torch.Tensor, syn_features: torch.Tensor,
                       iteration: int, num_iterations: int, mode: str,
                       end: float = 1.0) -> torch.Tensor:
    """Keep-mask over a class's real batch (Eq. 2-4).

    Eq. 2: ``z_syn = mean_j f(x_syn_j)``. Eq. 3: ``s_i = cos(z_syn, f(x_real_i))``.
    Eq. 4, with ``p = end * t / T`` (:func:`capacity_progress`; the paper: ``end = 1``):

    - typical mode (IPC < alpha): keep i iff ``s_i > s_min + p * (s_mean - s_min)``;
    - diverse mode (IPC >= alpha): keep i iff ``s_i <= s_max - p * (s_max - s_mean)``.

    Edge cases: when all scores are equal (within ``TIE_TOLERANCE``, so that rounding in the
    cosine does not decide) there is nothing to choose between and every sample is kept. If the
    rule keeps nothing otherwise (in typical mode only a batch of one can do that), the samples
    tied for the best score are kept: the most similar in typical mode, the least similar in
    diverse mode. So the mask is never empty.

    Args:
        real_features: (B, D) features of the real batch.
        syn_features: (S, D) features of the class's synthetic images (detached here).
        iteration: t in ``0 .. T-1``.
        num_iterations: T.
        mode: ``"typical"`` or ``"diverse"``.
        end: the largest progress (1 in the paper's text, 0.5 in the public code).

    Returns:
        Boolean tensor (B,).
    """
    if mode not in (TYPICAL, DIVERSE):
        raise ValueError(f"capacity mode must be {TYPICAL!r} or {DIVERSE!r}, got {mode!r}")
    z_syn = syn_features.detach().mean(dim=0, keepdim=True)
    scores = F.cosine_similarity(real_features.detach().float(), z_syn.float(), dim=1)
    progress = capacity_progress(iteration, num_iterations, end)
    s_min, s_max, s_mean = scores.min(), scores.max(), scores.mean()
    if float(s_max - s_min) <= TIE_TOLERANCE:
        return torch.ones_like(scores, dtype=torch.bool)
    if mode == TYPICAL:
        keep = scores > s_min + progress * (s_mean - s_min)
        best = scores >= s_max - TIE_TOLERANCE
    else:
        keep = scores <= s_max - progress * (s_max - s_mean)
        best = scores <= s_min + TIE_TOLERANCE
    if not bool(keep.any()):
        keep = best
    return keep


class CapacityMatching:
    """Plugin ``cap``: match each class's synthetic set against the real samples it can hold.

    As t/T grows, low-IPC sets (IPC < alpha) match only the real samples most typical of the
    synthetic set, high-IPC sets (IPC >= alpha) only the most diverse ones (Eq. 2-4, see
    :func:`capacity_keep_mask`). It reuses the features the host has already computed, so it
    costs no extra forward pass.

    Args:
        alpha: IPC threshold between the two modes (paper text: 50; the public code uses the
            typical rule up to IPC 100 and marks the diverse one "for high IPC 200-1000", which
            is ``alpha = 200``).
        end: the largest progress of the schedule (paper text: 1; public code: 0.5, see
            :func:`capacity_progress`).
        ipc: stored images per class; taken from the run context at setup when not given.
    """

    name = "cap"
    needs_experts = False
    options = (
        PluginOption("alpha", int, 50, "IPC threshold: typical mode below it, diverse mode at "
                     "or above it (paper 50; the public code's reading 200)",
                     check=at_least(1)),
        PluginOption("end", float, 1.0, "largest progress of the schedule p = end * t/T, in "
                     "(0, 1] (paper 1; the public code's reading 0.5)", check=in_unit_interval),
    )

    def __init__(self, alpha: int = 50, end: float = 1.0, ipc: int | None = None):
        if alpha < 1:
            raise ValueError(f"alpha must be >= 1, got {alpha}")
        if not 0 < end <= 1:
            raise ValueError(f"cap's end must be in (0, 1], got {end}")
        self.alpha = int(alpha)
        self.end = float(end)
        self.ipc = ipc

    @property
    def mode(self) -> str | None:
        """``"typical"`` or ``"diverse"`` for this run's IPC; None until the IPC is known."""
        return None if self.ipc is None else capacity_mode(self.ipc, self.alpha)

    @hookimpl
    def dm_setup(self, context):
        self.ipc = int(context.ipc)

    @hookimpl
    def dm_select_real(self, real_features, syn_features, iteration, num_iterations):
        if self.ipc is None:
            raise RuntimeError("CapacityMatching needs the IPC: call dm_setup first or pass ipc=")
        return capacity_keep_mask(real_features, syn_features, iteration, num_iterations,
                                  self.mode, self.end)

    def __repr__(self) -> str:
        return f"CapacityMatching(alpha={self.alpha}, end={self.end}, ipc={self.ipc})"
