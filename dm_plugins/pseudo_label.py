"""Pseudo-label matching (PTLM paper section 3.2, Eq. 7-9): plugin ``plm``."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .chunking import checkpointed_forward, chunk_for, default_syn_chunk
from .errors import PluginError
from .hookspecs import hookimpl
from .options import PluginOption, above, at_least
from .seeding import make_generator

_SAMPLE_STREAM = 0x9B

#: logits network: the trained expert (paper text) or the host's matching network (public code)
EXPERT, EXTRACTOR = "expert", "extractor"
#: target source: pooled pseudo-labels over many real images (paper text), or the class's
#: current augmented real batch (public code)
POOLED, BATCH = "pooled", "batch"
#: sharpening: softmax(mean / tau) (paper Eq. 8) or softmax(sum / tau) (public code)
MEAN, SUM = "mean", "sum"
#: step: added to the host's own image step (paper Eq. 10), or a separate step with its own
#: optimiser (public code, and the paper's Algorithm 1)
JOINT, SEPARATE = "joint", "separate"
_FLAGS = {"extractor": "--plm-logits extractor", "real_batch": "--plm-target batch",
          "separate_step": "--plm-step separate"}


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


def class_prediction(probabilities: torch.Tensor, label: int, reduce: str = MEAN
                     ) -> torch.Tensor:
    """Eq. 7 with a choice of reduction over the correctly classified samples of ``label``:
    ``"mean"`` is :func:`class_average_prediction` (the paper), ``"sum"`` their summed
    probability vectors (the public code, which then divides by its temperature). The one-hot
    fallback when no sample is classified correctly is the same for both (the public code would
    take the softmax of a zero vector there, a uniform target)."""
    if reduce == MEAN:
        return class_average_prediction(probabilities, label)
    if reduce != SUM:
        raise ValueError(f"reduce must be {MEAN!r} or {SUM!r}, got {reduce!r}")
    correct = probabilities.argmax(dim=1) == label
    if not bool(correct.any()):
        return F.one_hot(torch.tensor(label), probabilities.shape[1]).to(probabilities)
    return probabilities[correct].sum(dim=0)


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
                          classes=None, reduce: str = MEAN) -> torch.Tensor:
    """Eq. 7-8 for every class: (K, K) sharpened pseudo-labels of a frozen expert.

    Args:
        real: class-indexed real data (normalised).
        max_per_class: how many real images of each class the expert looks at (all of them
            when a class has fewer).
        batch_size: images per forward; bounds memory, does not change the result.
        classes: compute only these classes' rows (a class-sharded run); the others are the
            one-hot rows of their labels, never used there. Every class's images are still
            drawn, in class order, so the rows computed equal those of a full computation.
        reduce: ``"mean"`` (Eq. 7, the paper) or ``"sum"`` (:func:`class_prediction`).
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
        rows.append(class_prediction(probs.float(), c, reduce))
    return sharpen(torch.stack(rows), tau)


@torch.no_grad()
def batch_pseudo_labels(network: torch.nn.Module, real_images: torch.Tensor,
                        real_labels: torch.Tensor, num_classes: int, tau: float,
                        reduce: str = SUM) -> torch.Tensor:
    """The public code's targets: (K, K) rows, row c the sharpened prediction of the trained
    ``network`` on the real images of class c *in this batch* (the host's current augmented
    real batch), :func:`class_prediction` with ``reduce`` then :func:`sharpen`. Rows of classes
    absent from the batch are one-hot (never used: a host passes the real batch of the classes
    whose synthetic images it passes)."""
    rows = F.one_hot(torch.arange(num_classes), num_classes).float().to(real_images.device)
    for c in torch.unique(real_labels).tolist():
        probs = F.softmax(network(real_images[real_labels == c]), dim=1).float()
        rows[c] = sharpen(class_prediction(probs, c, reduce), tau)
    return rows


class PseudoLabelMatching:
    """Plugin ``plm``: predictions on synthetic images of class c are pulled toward a sharpened
    prediction of the trained expert on real images of c (Eq. 7-9).

    Two readings are selectable, option by option (the paper's text is the default of each):

    ========  ====================================  =========================================
    option    paper text (default)                  public code (``PTLM.py``)
    ========  ====================================  =========================================
    logits    ``expert``: the trained expert         ``extractor``: the host's matching network
              theta_star of ``experts.pick(t)``      of iteration t (PTM's interval network)
    target    ``pooled``: expert k's class-average   ``batch``: the expert's prediction on the
              prediction over up to                  class's current augmented real batch
              ``max_real_per_class`` real images,    (the host passes it; same augmentation
              computed once per expert and kept      draw as the synthetic images)
    sharpen   ``mean``: softmax(mean / tau), tau     ``sum``: softmax(sum / tau) over the
              0.1 (Eq. 8)                            correctly classified images, tau 0.01
    step      ``joint``: the host's own image step   ``separate``: a step of its own, with its
              (DM: added to the matching loss;       own SGD optimiser at ``lr`` and the host's
              DANCE: in place of the CE step)        momentum (DANCE's host runs it in place
                                                     of its inter-class CE step)
    ========  ====================================  =========================================

    The loss is :func:`pseudo_label_loss` (cross-entropy, averaged over each class's images,
    summed over classes) on the synthetic images the loop passes: exactly as the extractor saw
    them (decoded, normalised, augmented with the matching step's draw), as the hook spec
    states. ``extractor``, ``batch`` and ``separate`` need a host that offers them
    (:attr:`dm_plugins.DistillContext.offers`); one that does not is refused at setup.

    Pooled pseudo-labels depend only on the expert and the real data (``context.real``,
    required for ``target="pooled"``): expert k's are computed once, over up to
    ``max_real_per_class`` real images of each class drawn with a generator derived from
    (seed, k), and kept. By default that happens lazily, the first time expert k is picked
    (``lazy=True``); with ``lazy=False`` every expert's are computed in ``dm_setup``. Both give
    the same targets, and a resumed run the same as an uninterrupted one.

    Args:
        experts: an :class:`dm_plugins.ExpertPool`.
        tau: sharpening temperature (paper 0.1; the public code divides a sum by 0.01).
        logits, target, sharpen, step: the readings above.
        lr: the separate step's learning rate (public code: 0.01); unused with ``step="joint"``.
        max_real_per_class: real images per class for each expert's pooled pseudo-labels
            (default 500; the cost of computing them is linear in it).
        lazy: compute an expert's pseudo-labels at its first use instead of at setup.
        chunk: the forward on the synthetic images runs in chunks of at most this many
            images under activation checkpointing (bounded memory, one extra forward; same
            loss). None: :func:`dm_plugins.chunking.default_syn_chunk` of the device.
        compile: run that forward (and so its backward) through ``torch.compile``, compiled
            once per network: a one-off compile time, then faster iterations; the same
            loss up to float rounding.
    """

    name = "plm"
    needs_experts = True
    options = (
        PluginOption("tau", float, 0.1, "sharpening temperature (paper 0.1; the public code's "
                     "reading 0.01 on a sum)", check=above(0)),
        PluginOption("logits", str, EXPERT, "network whose predictions on the synthetic images "
                     "are matched: expert (paper) or extractor, the host's matching network "
                     "(public code)", choices=(EXPERT, EXTRACTOR)),
        PluginOption("target", str, POOLED, "target source: pooled pseudo-labels of each expert "
                     "(paper) or batch, the class's current augmented real batch (public code)",
                     choices=(POOLED, BATCH)),
        PluginOption("sharpen", str, MEAN, "softmax of the mean (paper Eq. 8) or of the sum "
                     "(public code) of the correct predictions, divided by tau",
                     choices=(MEAN, SUM)),
        PluginOption("step", str, JOINT, "joint: in the host's own image step (paper Eq. 10); "
                     "separate: a step with its own optimiser at --plm-lr (public code)",
                     choices=(JOINT, SEPARATE)),
        PluginOption("lr", float, 0.01, "learning rate of the separate step (public code 0.01)",
                     check=above(0)),
        PluginOption("max_real_per_class", int, 500, "real images per class for each expert's "
                     "pooled pseudo-labels", check=at_least(1)),
    )

    def __init__(self, experts=None, tau: float = 0.1, max_real_per_class: int = 500,
                 lazy: bool = True, chunk: int | None = None, compile: bool = False,
                 logits: str = EXPERT, target: str = POOLED, sharpen: str = MEAN,
                 step: str = JOINT, lr: float = 0.01):
        if experts is None:
            raise PluginError("plugin 'plm' needs an expert pool: pass experts=ExpertPool(...), "
                              "e.g. from ExpertPool.load_or_train")
        if not tau > 0:
            raise PluginError(f"plm's tau must be > 0, got {tau}")
        if int(max_real_per_class) < 1:
            raise PluginError(f"plm's max_real_per_class must be >= 1, got {max_real_per_class}")
        for name, value, allowed in (("logits", logits, (EXPERT, EXTRACTOR)),
                                     ("target", target, (POOLED, BATCH)),
                                     ("sharpen", sharpen, (MEAN, SUM)),
                                     ("step", step, (JOINT, SEPARATE))):
            if value not in allowed:
                raise PluginError(f"plm's {name} must be one of {', '.join(allowed)}, "
                                  f"got {value!r}")
        if not lr > 0:
            raise PluginError(f"plm's lr must be > 0, got {lr}")
        self.experts = experts
        self.tau = float(tau)
        self.max_real_per_class = int(max_real_per_class)
        self.lazy = bool(lazy)
        if chunk is not None and int(chunk) < 1:
            raise PluginError(f"plm's chunk must be >= 1, got {chunk}")
        self.chunk = None if chunk is None else int(chunk)
        self.compile = bool(compile)
        self.logits, self.target, self.sharpen, self.step = logits, target, sharpen, step
        self.lr = float(lr)
        self._compiled: dict[torch.nn.Module, object] = {}  # network -> compiled forward
        self.targets: dict[int, torch.Tensor] = {}  # expert index -> (K, K) sharpened targets
        self.context = None

    @staticmethod
    def needs_for(options: dict) -> frozenset[str]:
        """What these options ask of the host (:attr:`dm_plugins.DistillContext.offers`);
        a run driver checks it against the host before any work."""
        needs = set()
        if options.get("logits", EXPERT) == EXTRACTOR:
            needs.add("extractor")
        if options.get("target", POOLED) == BATCH:
            needs.add("real_batch")
        if options.get("step", JOINT) == SEPARATE:
            needs.add("separate_step")
        return frozenset(needs)

    @property
    def host_needs(self) -> frozenset[str]:
        """What this plugin asks of the host (see :meth:`needs_for`)."""
        return self.needs_for({"logits": self.logits, "target": self.target,
                               "step": self.step})

    @property
    def separate_step_lr(self) -> float | None:
        """The learning rate of the separate step this plugin asks for (None: joint)."""
        return self.lr if self.step == SEPARATE else None

    @staticmethod
    def refusal(needs: frozenset[str], offers: frozenset[str], host: str) -> str | None:
        """The one-line reason a host offering ``offers`` cannot run options that need
        ``needs`` (None when it can)."""
        for need in sorted(set(needs) - set(offers)):
            return (f"{_FLAGS[need]} needs a host that offers {need!r} (DistillContext.offers), "
                    f"and {host} does not; use the paper's reading of that option, or "
                    f"baselines/dance.py, whose host offers all three")
        return None

    @hookimpl
    def dm_setup(self, context):
        problem = self.refusal(self.host_needs, context.offers,
                               context.extra.get("method", "this host"))
        if problem:
            raise PluginError(f"plm: {problem}")
        if self.target == POOLED:
            real = context.require("real", "plm", "real images to compute the pseudo-labels "
                                   "from")
        else:
            real = context.real
        self.context, self.targets = context, {}
        if real is None:
            return
        network = self.experts.trained_network(0, context.device, context.memory_format)
        first = 0 if context.classes is None else context.classes[0]  # a class real holds
        probe = real.sample(first, 1, make_generator(0)).to(context.device)
        with torch.inference_mode():
            logits_dim = network(probe.contiguous(memory_format=context.memory_format)).shape[1]
        if logits_dim != context.num_classes:
            raise PluginError(f"plm: the experts predict {logits_dim} classes but the run has "
                              f"{context.num_classes}; use experts trained on this dataset")
        if not self.lazy and self.target == POOLED:
            for k in range(len(self.experts)):
                self.pseudo_labels(k)

    def pseudo_labels(self, k: int) -> torch.Tensor:
        """(K, K) pooled sharpened pseudo-labels of expert k (Eq. 7-8), computed once, kept."""
        if k not in self.targets:
            if self.context is None:
                raise PluginError("plm: dm_setup was not called (call PluginSet.setup first)")
            ctx = self.context
            self.targets[k] = compute_pseudo_labels(
                self.experts.trained_network(k, ctx.device, ctx.memory_format), ctx.real,
                ctx.num_classes, self.tau, self.max_real_per_class,
                make_generator(ctx.seed, _SAMPLE_STREAM, k), ctx.device,
                memory_format=ctx.memory_format, classes=ctx.classes, reduce=self.sharpen)
        return self.targets[k]

    def _forward(self, network):
        if not self.compile:
            return network
        if network not in self._compiled:
            self._compiled[network] = torch.compile(network)
        return self._compiled[network]

    @hookimpl
    def dm_auxiliary_loss(self, syn_images, syn_labels, iteration, extractor, real_images,
                          real_labels):
        if self.context is None:
            raise PluginError("plm: dm_setup was not called (call PluginSet.setup first)")
        k = self.experts.pick(iteration)
        expert = self.experts.trained_network(k, syn_images.device, self.context.memory_format)
        if self.target == POOLED:
            targets = self.pseudo_labels(k).to(syn_images.device)
        else:
            if real_images is None or real_labels is None:
                raise PluginError("plm: --plm-target batch, but the host passed no real batch "
                                  "to dm_auxiliary_loss (real_images=, real_labels=)")
            targets = batch_pseudo_labels(expert, real_images, real_labels,
                                          self.context.num_classes, self.tau, self.sharpen)
        if self.logits == EXPERT:
            network = expert
        else:
            if extractor is None:
                raise PluginError("plm: --plm-logits extractor, but the host passed no "
                                  "extractor to dm_auxiliary_loss (extractor=)")
            network = extractor
        chunk = default_syn_chunk(syn_images.device) if self.chunk is None else self.chunk
        logits = checkpointed_forward(self._forward(network), syn_images,
                                      chunk_for(network, chunk))
        return {"plm": pseudo_label_loss(logits, syn_labels, targets)}

    @hookimpl
    def dm_teardown(self):
        self.context = None

    def __repr__(self) -> str:
        return (f"PseudoLabelMatching(tau={self.tau}, logits={self.logits}, "
                f"target={self.target}, sharpen={self.sharpen}, step={self.step}, "
                f"experts={len(self.experts)})")
