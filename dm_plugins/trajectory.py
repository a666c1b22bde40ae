"""Pseudo-trajectory matching (PTLM paper section 3.1, Eq. 5-6): plugin ``ptm``."""
from __future__ import annotations

import torch
from torch import nn

from .errors import ExpertError, PluginError
from .hookspecs import hookimpl


def injection_ratio(iteration: int, num_iterations: int, lam: float = 1.0) -> float:
    """Eq. 5's injection ratio ``r = (t / lambda) / T`` (0 at t = 0, below 1/lambda after)."""
    return (iteration / lam) / num_iterations


def interpolate_parameters_(params: list[torch.Tensor], theta_init: list[torch.Tensor],
                            theta_star: list[torch.Tensor], ratio: float) -> None:
    """Write ``theta = r * theta_star + (1 - r) * theta_init`` (Eq. 5) into ``params`` in place.

    Uses fused multi-tensor ops: one copy and one lerp over all parameters, no allocation.
    """
    with torch.no_grad():
        torch._foreach_copy_(params, theta_init)
        torch._foreach_lerp_(params, theta_star, ratio)


class PseudoTrajectoryMatching:
    """Plugin ``ptm``: the extractor moves from an expert's initial weights toward its trained
    weights as t/T grows (Eq. 5), instead of being a fresh random network every iteration.

    Each iteration uses the expert ``experts.pick(t)`` (the same one PLM uses) and sets the
    extractor's parameters to ``r * theta_star + (1 - r) * theta_init`` with
    ``r = (t / lambda) / T``. The matching loss itself (Eq. 6) is the host's ordinary DM loss.
    Parameters only are interpolated (instance/group norm has no running buffers). Weights come
    from the pool's in-memory cache; nothing is read from disk inside the loop.

    Args:
        experts: an :class:`dm_plugins.experts.ExpertPool`.
        lam: lambda >= 1 (paper default 1); larger lambda injects less (lambda = 10 caps r at 0.1).
    """

    name = "ptm"
    needs_experts = True

    def __init__(self, experts=None, lam: float = 1.0):
        if experts is None:
            raise PluginError("plugin 'ptm' needs an expert pool: pass experts=ExpertPool(...) "
                              "(command line: --experts DIR, or let the script train them)")
        if lam < 1:
            raise PluginError(f"ptm's lambda must be >= 1, got {lam}")
        self.experts = experts
        self.lam = float(lam)
        self._device = torch.device("cpu")
        self._bound: tuple[nn.Module, list[torch.Tensor]] | None = None

    @hookimpl
    def dm_setup(self, context):
        try:
            self.experts.check_compatible(context.extractor)
        except ExpertError as exc:
            raise PluginError(f"ptm: {exc}") from None
        self._device = torch.device(context.device)
        for k in range(len(self.experts)):  # move every expert's weights once, up front
            self.experts.parameter_pair(k, self._device)

    def _params_of(self, extractor: nn.Module) -> list[torch.Tensor]:
        if self._bound is None or self._bound[0] is not extractor:
            self._bound = (extractor, [p for _, p in extractor.named_parameters()])
        return self._bound[1]

    @hookimpl
    def dm_update_extractor(self, extractor, iteration, num_iterations):
        params = self._params_of(extractor)
        theta_init, theta_star = self.experts.parameter_pair(self.experts.pick(iteration),
                                                              params[0].device)
        interpolate_parameters_(params, theta_init, theta_star,
                                injection_ratio(iteration, num_iterations, self.lam))
        return True

    @hookimpl
    def dm_teardown(self):
        self._bound = None

    def __repr__(self) -> str:
        return f"PseudoTrajectoryMatching(lam={self.lam}, experts={len(self.experts)})"
