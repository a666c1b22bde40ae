"""Pseudo-label matching (PTLM paper section 3.2, Eq. 7-9): plugin ``plm``."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .chunking import checkpointed_forward, chunk_for, default_syn_chunk
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


@torch.inference_mode()
def compute_pseudo_labels(network: torch.nn.Module, real, num_classes: int, tau: float,
                          max_per_class: int, generator: torch.Generator,
                          device: str | torch.device = "cpu", batch_size: int = 128,
                          memory_format: torch.memory_format = torch.contiguous_format,
                          classes=None) -> torch.Tensor:
    """Eq. 7-8 for every class: (K, K) sharpened pseudo-labels of a frozen expert.

    Args:
        real: class-indexed real data (normalised).
        max_per_class: how many real images of each class the expert looks at (all of them
            when a class has fewer).
        batch_size: images per forward; bounds memory, does not change the result.
        classes: compute only these classes' rows (a class-sharded run); the others are the
            one-hot rows of their labels, never used there. Every class's images are still
            drawn, in class order, so the rows computed equal those of a full computation.
    """
    wanted = None if classes is None else set(classes)
    rows = []
    for c in range(num_classes):
        images = real.sample(c, max_per_class, generator)
        if wanted is not None and c not in wanted:
            rows.append(F.one_hot(torch.tensor(c), num_classes).float().to(device))
            continue
        probs = torch.cat([
            F.softmax(network(chunk.to(device).contiguous(memory_format=memory_format)), dim=1)
            for chunk in images.split(batch_size)])
        rows.append(class_average_prediction(probs.float(), c))
    return sharpen(torch.stack(rows), tau)


class PseudoLabelMatching:
    """Plugin ``plm``: the expert's predictions on synthetic images of class c are pulled
    toward the sharpened class-average prediction ``y_hat_c`` of that expert on real images of c.

    Each iteration uses the trained weights theta_star of ``experts.pick(t)`` (the expert PTM
    uses), frozen, and returns ``{"plm": pseudo_label_loss(...)}`` on the synthetic images the
    loop passes: the images exactly as the extractor saw them (decoded, normalised, augmented
    with the matching step's draw), as the hook spec states.

    The pseudo-labels depend only on the expert and the real data (``context.real``, required):
    expert k's are computed once, over up to ``max_real_per_class`` real images of each class
    drawn with a generator derived from (seed, k), and kept. By default that happens lazily, the
    first time expert k is picked (``lazy=True``), so setup costs one small forward; with
    ``lazy=False`` every expert's are computed in ``dm_setup``. Both give the same targets, and a
    resumed run the same as an uninterrupted one.

    Args:
        experts: an :class:`dm_plugins.ExpertPool`.
        tau: sharpening temperature (paper default 0.1).
        max_real_per_class: real images per class for each expert's pseudo-labels (default 500;
            the cost of computing them is linear in it).
        lazy: compute an expert's pseudo-labels at its first use instead of at setup.
        chunk: the expert's forward on the synthetic images runs in chunks of at most this many
            images under activation checkpointing (bounded memory, one extra forward; same
            loss). None: :func:`dm_plugins.chunking.default_syn_chunk` of the device.
        compile: run that forward (and so its backward) through ``torch.compile``, compiled
            once per expert network: a one-off compile time, then faster iterations; the same
            loss up to float rounding.
    """

    name = "plm"
    needs_experts = True

    def __init__(self, experts=None, tau: float = 0.1, max_real_per_class: int = 500,
                 lazy: bool = True, chunk: int | None = None, compile: bool = False):
        if experts is None:
            raise PluginError("plugin 'plm' needs an expert pool: pass experts=ExpertPool(...), "
                              "e.g. from ExpertPool.load_or_train")
        if not tau > 0:
            raise PluginError(f"plm's tau must be > 0, got {tau}")
        if int(max_real_per_class) < 1:
            raise PluginError(f"plm's max_real_per_class must be >= 1, got {max_real_per_class}")
        self.experts = experts
        self.tau = float(tau)
        self.max_real_per_class = int(max_real_per_class)
        self.lazy = bool(lazy)
        if chunk is not None and int(chunk) < 1:
            raise PluginError(f"plm's chunk must be >= 1, got {chunk}")
        self.chunk = None if chunk is None else int(chunk)
        self.compile = bool(compile)
        self._compiled: dict[torch.nn.Module, object] = {}  # expert network -> compiled forward
        self.targets: dict[int, torch.Tensor] = {}  # expert index -> (K, K) sharpened targets
        self.context = None

    @hookimpl
    def dm_setup(self, context):
        real = context.require("real", "plm", "real images to compute the pseudo-labels from")
        self.context, self.targets = context, {}
        network = self.experts.trained_network(0, context.device, context.memory_format)
        first = 0 if context.classes is None else context.classes[0]  # a class real holds
        probe = real.sample(first, 1, make_generator(0)).to(context.device)
        with torch.inference_mode():
            logits_dim = network(probe.contiguous(memory_format=context.memory_format)).shape[1]
        if logits_dim != context.num_classes:
            raise PluginError(f"plm: the experts predict {logits_dim} classes but the run has "
                              f"{context.num_classes}; use experts trained on this dataset")
        if not self.lazy:
            for k in range(len(self.experts)):
                self.pseudo_labels(k)

    def pseudo_labels(self, k: int) -> torch.Tensor:
        """(K, K) sharpened pseudo-labels of expert k (Eq. 7-8), computed once and kept."""
        if k not in self.targets:
            if self.context is None:
                raise PluginError("plm: dm_setup was not called (call PluginSet.setup first)")
            ctx = self.context
            self.targets[k] = compute_pseudo_labels(
                self.experts.trained_network(k, ctx.device, ctx.memory_format), ctx.real,
                ctx.num_classes, self.tau, self.max_real_per_class,
                make_generator(ctx.seed, _SAMPLE_STREAM, k), ctx.device,
                memory_format=ctx.memory_format, classes=ctx.classes)
        return self.targets[k]

    @hookimpl
    def dm_auxiliary_loss(self, syn_images, syn_labels, iteration):
        k = self.experts.pick(iteration)
        targets = self.pseudo_labels(k).to(syn_images.device)
        network = self.experts.trained_network(k, syn_images.device, self.context.memory_format)
        chunk = default_syn_chunk(syn_images.device) if self.chunk is None else self.chunk
        forward = network
        if self.compile:
            if network not in self._compiled:
                self._compiled[network] = torch.compile(network)
            forward = self._compiled[network]
        logits = checkpointed_forward(forward, syn_images, chunk_for(network, chunk))
        return {"plm": pseudo_label_loss(logits, syn_labels, targets)}

    @hookimpl
    def dm_teardown(self):
        self.context = None

    def __repr__(self) -> str:
        return f"PseudoLabelMatching(tau={self.tau}, experts={len(self.experts)})"
