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
    * The public code's g is a pretrained ResNet-18 loaded from a file; here g is a network of
      the run's expert pool (the same architecture as the matching network, trained on the
      run's dataset), picked per iteration like ``ptm`` and ``plm`` pick theirs. It runs in
      eval mode (the public code calls ``train()`` on an instance-norm ResNet-18, for which the
      mode makes no difference; with batch-norm experts it would).
    * The sum over each class's images is the public code's, where the hook spec suggests a
      per-class mean: ``weight`` is tuned for the sum.

    Args:
        experts: a :class:`dm_plugins.ExpertPool` whose network has an ``embed`` method
            (passed by :meth:`dm_plugins.PluginSet.from_names` as a resource).
        weight: lambda_CC, >= 0 (the public DM code: 0.05; the public IDM code: 0.01).
    """

    name = "iid-cc"
    needs_experts = True
    options = (
        PluginOption("weight", float, 0.05, "lambda_CC, the weight of the class centralization "
                     "loss (public DM code 0.05; public IDM code 0.01)", check=non_negative),
    )

    def __init__(self, experts=None, weight: float = 0.05):
        problem = self.options[0].problem(weight)
        if problem:
            raise PluginError(f"iid-cc's weight {problem}, got {weight!r}")
        self.experts = experts
        self.weight = float(weight)
        self.context = None
        self._networks: dict[tuple[int, str], torch.nn.Module] = {}

    @hookimpl
    def dm_setup(self, context):
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
        return f"ClassCentralization(weight={self.weight}, experts={pool})"
