"""IID's class centralization L_CC (Deng et al., CVPR 2024): plugin ``iid-cc``, an auxiliary
loss on the synthetic images."""
from __future__ import annotations

import torch

from dm_plugins import PluginError, PluginOption, hookimpl

from .covariance import non_negative


def class_centralization_loss(embeddings: torch.Tensor, labels: torch.Tensor,
                              weight: float) -> torch.Tensor:
    """L_CC summed over the classes present in ``labels``::

        weight * sum_c sum_{j in c} ||g(s_j) - mu_c||^2,   mu_c = mean_{k in c} g(s_k)

    A sum over each class's images, not a mean (as in the public code, whose weights are set
    for it): the term grows with IPC. Since it is a sum over classes, calling it once per class
    adds up to one call with every class. A class with a single image contributes exactly 0.

    Args:
        embeddings: (N, ...) features g(s_j) of the synthetic images (flattened per image),
            carrying their graph; computed in at least float32.
        labels: (N,) their classes.
        weight: lambda_CC.
    """
    if embeddings.shape[0] != labels.shape[0]:
        raise PluginError(f"iid-cc: {embeddings.shape[0]} embeddings but {labels.shape[0]} "
                          f"labels")
    feats = embeddings.flatten(1)
    feats = feats.to(torch.promote_types(feats.dtype, torch.float32))
    classes, slot = torch.unique(labels, return_inverse=True)
    sums = feats.new_zeros(len(classes), feats.shape[1]).index_add(0, slot, feats)
    counts = torch.bincount(slot, minlength=len(classes)).to(feats)
    means = sums / counts[:, None]
    return weight * (feats - means[slot]).pow(2).sum()


class ClassCentralization:
    """Plugin ``iid-cc``: pull each class's synthetic images together (the paper's L_CC).

    Per iteration t (hook ``dm_auxiliary_loss``): g is the trained network of expert
    ``experts.pick(t)`` (frozen, built once per expert and kept), applied with its ``embed``
    to the synthetic images exactly as the host's extractor saw them (decoded, normalised,
    augmented with the matching step's draw). It returns
    ``{"iid_cc": weight * sum_c sum_{j in c} ||g(s_j) - mean_{k in c} g(s_k)||^2}``
    (:func:`class_centralization_loss`), the paper's ``lambda_CC * L_CC`` with
    ``lambda_CC = weight``. The host may call it once with every class or once per class: the
    loss is a sum over classes, so both give the same total.

    Departures from the paper, stated:

    * The paper writes L_CC with an exp() and a threshold beta. A comment in the public code
      says the plain squared distance to the class mean (beta = 0, no exp) gave the same
      result, and that code uses the plain form; so does this plugin.
    * The public code's g is a pretrained ResNet-18 loaded from a file. By default
      (``network="experts"``) g is a network of the run's expert pool instead (the same
      architecture as the matching network, trained on the run's dataset), picked per
      iteration like ``ptm`` and ``plm`` pick theirs. ``network="resnet18"`` asks the host for
      a pool of ResNet-18s trained on the run's data by the same expert training (the
      ``expert_pools`` resource; the harness trains it on first use) and picks from it. g runs
      in eval mode (the public code calls ``train()`` on an instance-norm ResNet-18, for which
      the mode makes no difference; our ResNet-18 has batch norm, whose running statistics
      eval mode uses). The run's own pool is loaded either way (``needs_experts``).
    * The sum over each class's images is the public code's, where the hook spec suggests a
      per-class mean: ``weight`` is tuned for the sum.

    Args:
        experts: a :class:`dm_plugins.ExpertPool` whose network has an ``embed`` method
            (passed by :meth:`dm_plugins.PluginSet.from_names` as a resource).
        weight: lambda_CC, >= 0 (the public DM code: 0.05; the public IDM code: 0.01).
        network: where g comes from: ``"experts"`` (the run's pool) or ``"resnet18"`` (a
            ResNet-18 pool from ``expert_pools``, as the public code's g).
        expert_pools: ``expert_pools(arch) -> ExpertPool`` (a resource of the host; needed
            only for ``network="resnet18"``).
    """

    name = "iid-cc"
    needs_experts = True
    options = (
        PluginOption("weight", float, 0.05, "lambda_CC, the weight of the class centralization "
                     "loss (public DM code 0.05; public IDM code 0.01)", check=non_negative),
        PluginOption("network", str, "experts", "g, the network whose features are pulled to "
                     "their class mean: 'experts' (the run's expert pool; our default) or "
                     "'resnet18' (a pool of ResNet-18s trained on the run's data, as the "
                     "public code's g)", choices=("experts", "resnet18")),
    )

    def __init__(self, experts=None, weight: float = 0.05, network: str = "experts",
                 expert_pools=None):
        for option, value in zip(self.options, (weight, network)):
            problem = option.problem(value)
            if problem:
                raise PluginError(f"iid-cc's {option.name} {problem}, got {value!r}")
        self.weight, self.network_source = float(weight), network
        self.expert_pools = expert_pools
        self.experts = experts
        self.context = None
        self._networks: dict[tuple[int, str], torch.nn.Module] = {}

    @hookimpl
    def dm_setup(self, context):
        if self.network_source != "experts":
            if self.expert_pools is None:
                raise PluginError(f"iid-cc --iid-cc-network {self.network_source}: this loop "
                                  f"offers no expert_pools resource; pass expert_pools= to "
                                  f"PluginSet.from_names, or use network 'experts'")
            self.experts = self.expert_pools(self.network_source)
        if self.experts is None:
            raise PluginError("plugin 'iid-cc' needs an expert pool (its g is a trained "
                              "expert): pass experts=ExpertPool(...) to PluginSet.from_names")
        self.context, self._networks = context, {}
        if not callable(getattr(self.network(0, context.device), "embed", None)):
            raise PluginError("iid-cc: the experts' network has no embed(x) method; use an "
                              "architecture with one (the ConvNets of dm_plugins have it)")

    def network(self, k: int, device) -> torch.nn.Module:
        """Expert k's trained network on ``device`` in the run's memory format, frozen; built
        on first use and kept."""
        if self.context is None:
            raise PluginError("iid-cc: dm_setup was not called (call PluginSet.setup first)")
        key = (int(k), str(torch.device(device)))
        if key not in self._networks:
            self._networks[key] = self.experts.trained_network(
                k, device, self.context.memory_format).requires_grad_(False)
        return self._networks[key]

    @hookimpl
    def dm_auxiliary_loss(self, syn_images, syn_labels, iteration):
        g = self.network(self.experts.pick(iteration), syn_images.device)
        return {"iid_cc": class_centralization_loss(g.embed(syn_images), syn_labels,
                                                    self.weight)}

    @hookimpl
    def dm_teardown(self):
        self.context, self._networks = None, {}

    def __repr__(self) -> str:
        pool = "none" if self.experts is None else len(self.experts)
        return (f"ClassCentralization(weight={self.weight}, network={self.network_source!r}, "
                f"experts={pool})")
