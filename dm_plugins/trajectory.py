"""Pseudo-trajectory matching (PTLM paper section 3.1, Eq. 5-6): plugin ``ptm``."""
from __future__ import annotations

import torch
from torch import nn

from .errors import ExpertError, PluginError
from .hookspecs import hookimpl
from .seeding import preserved_global_rng
from .wrapping import wrap_like
from .options import PluginOption, at_least


def injection_ratio(iteration: int, num_iterations: int, lam: float = 1.0) -> float:
    """Eq. 5's injection ratio ``r = (t / lambda) / T`` (0 at t = 0, below 1/lambda after)."""
    return (iteration / lam) / num_iterations


def interpolate_parameters_(params: list[torch.Tensor], theta_init: list[torch.Tensor],
                            theta_star: list[torch.Tensor], ratio: float) -> None:
    """Write ``theta = r * theta_star + (1 - r) * theta_init`` (Eq. 5) into ``params`` in place.

    Uses fused multi-tensor ops: one copy and one lerp over all parameters, no allocation.
    """
    if not params:
        return
    with torch.no_grad():
        torch._foreach_copy_(params, theta_init)
        torch._foreach_lerp_(params, theta_star, ratio)


class PseudoTrajectoryMatching:
    """Plugin ``ptm``: the extractor moves from an expert's initial weights toward its trained
    weights as t/T grows (Eq. 5), instead of being a fresh random network every iteration.

    It *provides* the extractor (hook ``dm_provide_extractor``): a network of the experts'
    architecture that this plugin owns, built once at setup on the loop's device and memory
    format, and wrapped as the loop's network is (``context.extractor``, else what the pool's
    factory returns: ``nn.DataParallel``, ``torch.compile``; a DistributedDataParallel network
    gets a plain holder with ``.module``, since DDP cannot wrap a frozen network). Each
    iteration it writes ``r * theta_star + (1 - r) * theta_init`` of expert
    ``experts.pick(t)`` (the expert PLM uses) into that network's parameters, with
    ``r = (t / lambda) / T``, and returns it. It never touches a network of the loop or the
    method. The matching loss (Eq. 6) is the loop's ordinary DM loss. Buffers (batch norm's) are
    set with the parameters: floating-point ones (running mean and variance) blended by the same
    ``r``, the others (``num_batches_tracked``) the trained expert's; instance and group norm
    have none. A train-mode forward still updates batch norm's running statistics within the
    iteration, and the next iteration starts from the blend again. Weights come from the
    pool's in-memory cache, nothing is read from disk inside the loop.

    Args:
        experts: an :class:`dm_plugins.ExpertPool`.
        lam: lambda >= 1 (paper default 1); larger lambda injects less (lambda = 10 caps r at 0.1).
            The public code's interval model ``l * theta_init + (1 - l) * theta_star`` with
            ``l = (T - t/2) / T`` is ``r = t / (2T)``: ``lam = 2``.
    """

    name = "ptm"
    needs_experts = True
    options = (
        PluginOption("lam", float, 1.0, "lambda >= 1: injection ratio r = (t/lambda)/T (paper 1; "
                     "the public code's reading 2)", check=at_least(1)),
    )

    def __init__(self, experts=None, lam: float = 1.0):
        if experts is None:
            raise PluginError("plugin 'ptm' needs an expert pool: pass experts=ExpertPool(...), "
                              "e.g. from ExpertPool.load_or_train")
        if not lam >= 1:
            raise PluginError(f"ptm's lambda must be >= 1, got {lam}")
        self.experts = experts
        self.lam = float(lam)
        self.network: nn.Module | None = None
        self.provided: nn.Module | None = None   # self.network in the loop's wrappers
        self._params: list[torch.Tensor] = []
        self._buffers: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])

    @hookimpl
    def dm_setup(self, context):
        if context.extractor is not None:
            try:
                self.experts.check_compatible(context.extractor)
            except ExpertError as exc:
                raise PluginError(f"ptm: {exc}") from None
        self.network = self.experts.network(context.device, context.memory_format)
        self._params = list(self.network.parameters())
        state = self.network.state_dict(keep_vars=True)   # persistent buffers, as the pool's
        buffers = [b for n, b in self.network.named_buffers() if n in state]
        self._buffers = ([b for b in buffers if b.is_floating_point()],
                         [b for b in buffers if not b.is_floating_point()])
        # wrapped as the loop's own network is (DataParallel, torch.compile, DDP-like), so a
        # loop that calls net.module.embed works unchanged; the wrappers share the parameters
        template = context.extractor
        if template is None:
            with preserved_global_rng():  # building a template must not move the loop's RNG
                template = self.experts.network_factory()
        self.provided = wrap_like(template, self.network)
        for k in range(len(self.experts)):  # move every expert's weights once, up front
            self.experts.parameter_pair(k, context.device)
            if any(self._buffers):
                self.experts.buffer_triple(k, context.device)

    @hookimpl
    def dm_provide_extractor(self, iteration, num_iterations):
        if self.network is None:
            raise PluginError("ptm: dm_setup was not called (call PluginSet.setup first)")
        k, device = self.experts.pick(iteration), self._params[0].device
        ratio = injection_ratio(iteration, num_iterations, self.lam)
        theta_init, theta_star = self.experts.parameter_pair(k, device)
        interpolate_parameters_(self._params, theta_init, theta_star, ratio)
        if any(self._buffers):   # batch norm: running statistics blended, counters trained
            init, star, counters = self.experts.buffer_triple(k, device)
            interpolate_parameters_(self._buffers[0], init, star, ratio)
            with torch.no_grad():
                for buffer, value in zip(self._buffers[1], counters):
                    buffer.copy_(value)
        return self.provided

    @hookimpl
    def dm_teardown(self):
        self.network, self.provided, self._params, self._buffers = None, None, [], ([], [])

    def __repr__(self) -> str:
        return f"PseudoTrajectoryMatching(lam={self.lam}, experts={len(self.experts)})"
