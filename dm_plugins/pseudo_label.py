"""Pseudo-label matching (PTLM paper section 3.2, Eq. 7-9): plugin ``plm``."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import PluginError
from .hookspecs import hookimpl
from .seeding import make_generator

_SAMPLE_STREAM = 0x9B


def class_average_prediction(probabilities: torch.Tensor, label: int) -> torch.Tensor:
    """Eq. 7: the mean probability vector over the samples of class ``label`` the expert
    classifies correctly (misclassified samples are dropped).

    If the expert gets every sample of the class wrong, the one-hot vector of ``label`` is
    returned instead (there is no correct prediction to average; this falls back to hard-label
    matching for that class).

    Args:
        probabilities: (n, K) softmax outputs of the expert on real images of class ``label``.
    """
    correct = probabilities.argmax(dim=1) == label
    if not bool(correct.any()):
        return F.one_hot(torch.tensor(label), probabilities.shape[1]).to(probabilities)
    return probabilities[correct].mean(dim=0)


def sharpen(average: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 8: ``y_hat = softmax(y_avg / tau)`` along the last dimension."""
    return F.softmax(average / tau, dim=-1)


def pseudo_label_loss(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor
                      ) -> torch.Tensor:
    """Eq. 9: cross-entropy of the expert's predictions on synthetic images against the
    sharpened class targets, averaged over each class's images, summed over classes.

    Args:
        logits: (N, K) expert outputs on the synthetic images.
        labels: (N,) their classes.
        targets: (K, K) row c = y_hat_c.
    """
    per_image = -(targets[labels] * F.log_softmax(logits, dim=1)).sum(dim=1)
    num_classes = targets.shape[0]
    sums = torch.zeros(num_classes, dtype=per_image.dtype, device=per_image.device)
    sums.index_add_(0, labels, per_image)
    counts = torch.bincount(labels, minlength=num_classes)
    present = counts > 0
    return (sums[present] / counts[present].to(sums)).sum()


@torch.no_grad()
def compute_pseudo_labels(network: torch.nn.Module, real, num_classes: int, tau: float,
                          max_per_class: int, generator: torch.Generator,
                          device: str | torch.device = "cpu", batch_size: int = 500
                          ) -> torch.Tensor:
    """Eq. 7-8 for every class: (K, K) sharpened pseudo-labels of a frozen expert.

    Args:
        real: class-indexed real data (normalised).
        max_per_class: how many real images of each class the expert looks at.
    """
    rows = []
    for c in range(num_classes):
        images = real.sample(c, max_per_class, generator)
        probs = torch.cat([F.softmax(network(images[i:i + batch_size].to(device)), dim=1)
                           for i in range(0, images.shape[0], batch_size)])
        rows.append(class_average_prediction(probs.float(), c))
    return sharpen(torch.stack(rows), tau)


class PseudoLabelMatching:
    """Plugin ``plm``: the expert's predictions on synthetic images of class c are pulled
    toward the sharpened class-average prediction ``y_hat_c`` of that expert on real images of c.

    The pseudo-labels depend only on the expert and the real data: they are computed once per
    expert at setup (over up to ``max_real_per_class`` real images per class) and cached. Each
    iteration uses the trained weights theta_star of ``experts.pick(t)`` (the expert PTM uses),
    frozen, and returns :func:`pseudo_label_loss` on the host's synthetic images.

    Args:
        experts: an :class:`dm_plugins.experts.ExpertPool`.
        tau: sharpening temperature (paper default 0.1).
        max_real_per_class: real images per class used for the pseudo-labels.
    """

    name = "plm"
    needs_experts = True

    def __init__(self, experts=None, tau: float = 0.1, max_real_per_class: int = 500):
        if experts is None:
            raise PluginError("plugin 'plm' needs an expert pool: pass experts=ExpertPool(...) "
                              "(command line: --experts DIR, or let the script train them)")
        if tau <= 0:
            raise PluginError(f"plm's tau must be > 0, got {tau}")
        self.experts = experts
        self.tau = float(tau)
        self.max_real_per_class = int(max_real_per_class)
        self.targets: torch.Tensor | None = None  # (num_experts, K, K)
        self.memory_format = torch.contiguous_format

    @hookimpl
    def dm_setup(self, context):
        device = torch.device(context.device)
        if context.extra.get("memory_format") == "channels_last":  # follow the host's layout
            self.memory_format = torch.channels_last
        rows = []
        for k in range(len(self.experts)):
            network = self.experts.trained_network(k, device)
            logits_dim = network(context.real.sample(0, 1, make_generator(0)).to(device)).shape[1]
            if logits_dim != context.num_classes:
                raise PluginError(f"plm: the experts predict {logits_dim} classes but the run has "
                                  f"{context.num_classes}; use experts trained on this dataset")
            rows.append(compute_pseudo_labels(
                network, context.real, context.num_classes, self.tau, self.max_real_per_class,
                make_generator(context.seed, _SAMPLE_STREAM, k), device))
        self.targets = torch.stack(rows)

    @hookimpl
    def dm_auxiliary_loss(self, syn_images, syn_labels, iteration):
        if self.targets is None:
            raise RuntimeError("PseudoLabelMatching.dm_setup was not called")
        k = self.experts.pick(iteration)
        network = self.experts.trained_network(k, syn_images.device, self.memory_format)
        targets = self.targets[k].to(syn_images.device)
        return pseudo_label_loss(network(syn_images), syn_labels, targets)

    def __repr__(self) -> str:
        return f"PseudoLabelMatching(tau={self.tau}, experts={len(self.experts)})"
