"""IDM (Zhao et al., "Improved Distribution Matching for Dataset Condensation", CVPR 2023) as a
host loop; the facts it follows are in ``docs/methods.md#idm-and-dance``.

This module is the method only: it calls no dm_plugins hook. It names the three points where a
hook can go, as methods a subclass overrides (``adapters/idm.py`` does, calling
:class:`dm_plugins.PluginSet` there), plus :meth:`IDM.start` / :meth:`IDM.close` around a run:

* :meth:`IDM.matching_extractor` -- the network whose features are matched (IDM: the queue net
  drawn for the pass);
* :meth:`IDM.select_real` -- which real features of a class are matched (IDM: all of them);
* :meth:`IDM.extra_losses` -- named losses added to a class's loss (IDM: none).

One iteration ``t`` (the order of the authors' main loop):

1. if ``t > 0`` and ``t % meter_interval == 0``: every queue net's accuracy meter is reset (the
   reference resets them at its evaluation points, every ``eval_interval`` iterations);
2. if ``t % net_generate_interval == 0`` (``t = 0`` included): a new random net is pushed onto
   the model queue; when ``net_num`` nets are held the oldest is evicted first (FIFO). The queue
   starts with 3 random nets, so iteration 0 sees 4;
3. ``train_net_num`` distinct queue nets are drawn (1 in every published command); for each, a
   *matching pass*: the net in eval mode; per class ``c`` in order, a real batch of the class
   and the class's decoded synthetic images get one Siamese DSA draw; the loss of class ``c`` is

   ``|| mean f(real_c) - mean f(syn_c) ||^2 + ce_weight * acc * CE(net(syn_c), c)``

   with ``acc`` the net's running training accuracy in percent (0 before it has been trained
   since the last reset), followed by one SGD step on the stored images. One SGD optimiser
   (lr 0.2, momentum 0.5) holds every stored image, so the per-class steps share one momentum
   buffer: class c's step also moves the other classes' images by their momentum;
4. ``fetch_net_num`` (2) distinct queue nets are drawn and each is trained ``model_train_steps``
   (10) SGD steps (lr 0.01, momentum 0.9, weight decay 5e-4) on batches of ``trained_bs`` (256)
   un-augmented real images drawn from the whole training set; the meter counts each step's
   predictions (made before the step) on its batch.

Every random draw comes from a generator derived from the run seed and ``t`` (and the pass, class
or training slot), and queue nets are initialised from a seed derived from their serial number,
so a resumed run equals an uninterrupted one; :meth:`IDM.state_dict` holds the queue (every
net's weights, optimiser state and meter). The queue is :mod:`baselines.methods.idm_queue`'s.

Class-sharded (``shard=``, ``torchrun --nproc-per-node K baselines/idm.py``; the contract is
:mod:`dm_plugins.distributed`'s): a process holds and optimises only its classes' stored
images; the result equals one process's up to float rounding. IDM couples the classes in two
ways, and a sharded host handles them without exchanging anything but the logged sums:

* the model queue, whose nets train on real batches of every class each iteration and whose
  running accuracy weights every class's CE term: every process keeps every class's real
  images and runs the whole queue (pushes, evictions, training, meters) itself, identically,
  from the same seeds. This is replicated, not split: each process pays the queue's full
  training cost (``fetch_net_num x model_train_steps`` steps an iteration), its memory (up to
  ``net_num`` nets with their optimiser states) and the whole real training set, and each
  process's checkpoint holds the whole queue. Only the matching passes are split;
* the one image optimiser whose per-class steps share one momentum buffer: a process steps for
  every class in order, a zero-gradient step for a class it does not hold
  (:func:`dm_plugins.synthetic.image_step`), so its images move as in one process.

A pass's real batches are drawn for every class from one generator (the images of the classes
a process does not hold are not copied) and only its classes' are augmented and forwarded;
the run driver refuses BatchNorm networks for runs of several processes.

Deliberate differences from the reference code (all documented, none changes a loss):

* Randomness is seeded (the reference seeds DSA and networks from the wall clock).
* Exactly ``num_iterations`` iterations (the reference loop runs ``Iteration + 1``).
* Partition: the harness factorisation (``baselines/harness/factorization.py``, factor 2)
  stores the same 2x2 mosaic and decodes each quadrant with the same bilinear x2 upsampling, but
  lists the decoded images image-major with cells row-major (TL, TR, BL, BR of image 0, then
  image 1, ...), where the reference lists quadrant-major in the order TL, BL, TR, BR. Within a
  class this is a permutation; the matching loss and the CE term are means over the class's
  images and Siamese DSA gives every image of a class the same transform, so neither depends
  on the order (tested). Initialisation draws ``4 * IPC`` distinct real images per class, where
  the reference draws each quadrant independently (an image can repeat).
* The reference's special case for IPC 1 without the partition (top-k real selection, CE only
  when misclassified) is not implemented; no published command uses it.
* No evaluation during distillation and no selection of a synthetic set by test accuracy; the
  driver evaluates the final set.
* The CE logits reuse the synthetic features through ``net.classifier`` when the net has one
  (every harness network computes ``forward(x) = classifier(embed(x))``): same numbers, one
  forward fewer.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dm_plugins.experts import build_network
from dm_plugins.chunking import chunk_for, chunked_features, default_real_chunk
from dm_plugins.named_losses import merge_losses
from dm_plugins.distributed import ClassShard, skip_sample
from dm_plugins.seeding import make_generator
from dm_plugins.synthetic import (check_batch_independent, check_host_args, image_step,
                                  restore_synthetic, run_iterations, shard_classes,
                                  sum_over_shards, synthetic_state)

from .idm_queue import ModelQueue, QueueNet, _to_cpu


__all__ = ["IDM", "ModelQueue", "QueueNet", "MatchingPass"]

_PICK_STREAM = 0x1D1    # which queue nets match at iteration t
_REAL_STREAM = 0x1D2    # the real batches of (t, pass)
_AUG_STREAM = 0x1D3     # the DSA draw of (t, pass, class)
_FETCH_STREAM = 0x1D4   # which queue nets are trained at t
_TRAIN_STREAM = 0x1D5   # the training batches of (t, slot)


@dataclass
class MatchingPass:
    """What one matching pass of iteration ``t`` shares across its classes."""

    t: int
    k: int                           # pass index within the iteration (0 .. train_net_num - 1)
    queue_net: QueueNet              # the queue net drawn for the pass (supplies the CE term)
    extractor: nn.Module             # the network whose features are matched
    real_features: list[torch.Tensor]  # per class, (B_c, D), no graph
    ce_scale: float                  # ce_weight * queue_net.accuracy (percent), fixed for the pass


class IDM:
    """IDM over class-indexed real data (normalised); stored images sorted by class.

    Args:
        real: class-indexed real data (:class:`dm_plugins.ClassIndexedTensors` or any
            :class:`dm_plugins.ClassIndexedData`).
        network_factory: ``() -> nn.Module`` with ``embed(x)`` (the matched features) and
            ``forward(x)`` (logits).
        syn_init: (C * ipc, C_img, H, W) stored images, normalised, sorted by class.
        num_iterations: T (paper: 20,000).
        augment: Siamese augmentation ``augment(images, groups, generator)`` (DSA), or None.
        decode: stored -> matched images, ``decode(stored, labels) -> (images, labels)`` (the 2x2
            partition), or None.
        batch_real: real images per class per matching pass (256; 5,000 at IPC 1).
        lr, momentum: the image optimiser (SGD 0.2, 0.5).
        ce_weight: weight of the class-aware term, multiplied by the net's accuracy in percent.
        net_num: queue capacity (100). net_generate_interval: iterations between pushes (30).
        initial_nets: nets in the queue before iteration 0 (3).
        train_net_num: queue nets that match per iteration (the reference's ``train_net_num``;
            1 in every published command).
        fetch_net_num: queue nets trained per iteration (2).
        model_train_steps, trained_bs, lr_net, net_momentum, net_weight_decay: their training
            (10 SGD steps on 256 real images; lr 0.01, momentum 0.9, weight decay 5e-4).
        meter_interval: iterations between accuracy-meter resets (the reference's
            ``eval_interval``: 100, or 500 at IPC 50 on CIFAR).
        seed: all random draws derive from it.
        channels_last: networks and images in channels-last memory format (faster on CPU).
        real_chunk: the real forward of a pass runs in chunks of at most this many images (None:
            the device's default, :func:`dm_plugins.chunking.default_real_chunk`; never chunked
            for networks with BatchNorm in training mode).
        shard: a :class:`dm_plugins.distributed.ClassShard`: optimise only its classes
            (``syn_init`` then holds only theirs, sorted by class; ``real`` must still hold
            every class, for the queue); the logged losses and ``real_kept`` are summed over
            the ranks (see the module docstring). None: every class.
    """

    def __init__(self, real, network_factory: Callable[[], nn.Module], syn_init: torch.Tensor, *,
                 num_iterations: int, augment=None, decode=None, batch_real: int = 256,
                 lr: float = 0.2, momentum: float = 0.5, ce_weight: float = 0.5,
                 net_num: int = 100, net_generate_interval: int = 30, initial_nets: int = 3,
                 train_net_num: int = 1, fetch_net_num: int = 2, model_train_steps: int = 10,
                 trained_bs: int = 256, lr_net: float = 0.01, net_momentum: float = 0.9,
                 net_weight_decay: float = 5e-4, meter_interval: int = 100, seed: int = 0,
                 device: str | torch.device = "cpu", channels_last: bool = False,
                 real_chunk: int | None = None, extra: dict | None = None,
                 shard: ClassShard | None = None):
        self.real = real
        real_chunk = default_real_chunk(device) if real_chunk is None else real_chunk
        self.network_factory = network_factory
        self.num_classes = int(real.num_classes)
        self.shard = shard
        self.classes = shard_classes("IDM", shard, self.num_classes)
        if shard is not None:
            held = getattr(real, "held_classes", None)
            if held is not None and len(held) < self.num_classes:
                raise ValueError(f"IDM: a class-sharded host needs every class's real images "
                                 f"(its model queue trains on all of them); the data holds "
                                 f"classes {held}")
            check_batch_independent("IDM", build_network(network_factory).train())
        self.ipc = check_host_args("IDM", syn_init, len(self.classes), positive={
            "num_iterations": num_iterations, "batch_real": batch_real, "net_num": net_num,
            "net_generate_interval": net_generate_interval, "initial_nets": initial_nets,
            "train_net_num": train_net_num, "trained_bs": trained_bs,
            "meter_interval": meter_interval, "real_chunk": real_chunk},
            nonnegative={"fetch_net_num": fetch_net_num, "model_train_steps": model_train_steps})
        self.num_iterations = int(num_iterations)
        self.augment, self.decode = augment, decode
        self.batch_real = int(batch_real)
        self.ce_weight = float(ce_weight)
        self.net_generate_interval = int(net_generate_interval)
        self.train_net_num, self.fetch_net_num = int(train_net_num), int(fetch_net_num)
        self.model_train_steps, self.trained_bs = int(model_train_steps), int(trained_bs)
        self.meter_interval = int(meter_interval)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.real_chunk = int(real_chunk)
        self.extra = dict(extra or {})
        self.syn = syn_init.detach().clone().to(self.device).requires_grad_(True)
        self.syn_labels = torch.arange(self.classes.start, self.classes.stop,
                                       device=self.device).repeat_interleave(self.ipc)
        self.optimizer = torch.optim.SGD([self.syn], lr=lr, momentum=momentum)
        self.queue = ModelQueue(network_factory, capacity=net_num, initial=initial_nets,
                                seed=self.seed, device=self.device,
                                memory_format=self.memory_format, lr=lr_net,
                                momentum=net_momentum, weight_decay=net_weight_decay)
        self._train_images, self._train_labels = _flat_real(real, self.num_classes)
        self.iteration = 0
        self._started = False

    # -- the hook points: a subclass (adapters/idm.py) overrides these ---------------------
    def matching_extractor(self, t: int, queue_net: nn.Module) -> nn.Module:
        """The network whose features pass ``t`` matches. IDM: the queue net drawn for it."""
        return queue_net

    def select_real(self, label: int, real_features: torch.Tensor, syn_features: torch.Tensor,
                    t: int) -> torch.Tensor:
        """The real features of class ``label`` that are matched. IDM: all of them."""
        return real_features

    def feature_losses(self, label: int, real_features: torch.Tensor,
                       syn_features: torch.Tensor, t: int) -> dict[str, torch.Tensor]:
        """Named losses on class ``label``'s features, added to its loss (the matched real
        features, no graph; the synthetic ones with graph). IDM: none."""
        return {}

    def extra_losses(self, syn_images: torch.Tensor, syn_labels: torch.Tensor,
                     t: int, extractor: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Named losses added to one class's loss (images decoded and augmented as matched;
        ``extractor``: the pass's matching network). IDM: none."""
        return {}

    def start(self) -> None:
        """Called once before the first iteration (idempotent)."""
        self._started = True

    def close(self) -> None:
        """Called once after the last iteration, also on errors (idempotent)."""
        self._started = False

    # -- random draws ----------------------------------------------------------------------
    def matching_picks(self, t: int) -> list[int]:
        """Queue positions of the nets that match at ``t`` (distinct, uniformly drawn)."""
        g = make_generator(self.seed, _PICK_STREAM, t)
        return torch.randperm(len(self.queue), generator=g)[:self.train_net_num].tolist()

    def training_picks(self, t: int) -> list[int]:
        """Queue positions of the nets trained at ``t`` (distinct, uniformly drawn)."""
        g = make_generator(self.seed, _FETCH_STREAM, t)
        return torch.randperm(len(self.queue), generator=g)[:self.fetch_net_num].tolist()

    def _augment(self, x: torch.Tensor, labels: torch.Tensor, t: int, k: int, c: int
                 ) -> torch.Tensor:
        """The class's Siamese draw of pass (t, k): real and synthetic calls get equal seeds."""
        if self.augment is not None:
            x = self.augment(x, labels, make_generator(self.seed, _AUG_STREAM, t, k, c))
        return x.contiguous(memory_format=self.memory_format)

    # -- pieces of one iteration -----------------------------------------------------------
    def prepare_iteration(self, t: int) -> None:
        """Steps 1-2: reset the meters at the interval, push a new net at the interval."""
        if t > 0 and t % self.meter_interval == 0:
            self.queue.reset_meters()
        if t % self.net_generate_interval == 0:
            self.queue.push()

    def prepare_pass(self, t: int, k: int, queue_net: QueueNet) -> MatchingPass:
        """Set up pass ``k`` of iteration ``t``: the extractor and every class's real features
        (one batched forward without a graph; a sharded host's other classes get none)."""
        queue_net.net.eval()  # as the reference; no effect on instance-norm ConvNets
        extractor = self.matching_extractor(t, queue_net.net)
        g = make_generator(self.seed, _REAL_STREAM, t, k)
        batches = [(self.real.sample if c in self.classes else partial(skip_sample, self.real))(
            c, self.batch_real, g).to(self.device) for c in range(self.num_classes)]
        with torch.no_grad():
            augmented = torch.cat([  # a class's draw has its own generator: skipping is safe
                self._augment(b, torch.full((b.shape[0],), c, dtype=torch.long), t, k, c)
                if c in self.classes else b for c, b in enumerate(batches)])
            features = chunked_features(extractor.embed, augmented,
                                        chunk_for(extractor, self.real_chunk))
        real_features = list(features.split([b.shape[0] for b in batches]))
        return MatchingPass(t, k, queue_net, extractor, real_features,
                            self.ce_weight * queue_net.accuracy)

    def class_loss(self, p: MatchingPass, c: int) -> tuple[torch.Tensor, dict]:
        """Class ``c``'s loss in pass ``p`` (matching + weighted CE + extra losses) and its
        parts: ``match``, ``ce`` (weighted), ``ce_raw``, the extra losses by name (tensors), and
        ``kept`` (how many real samples were matched, an int); ``c`` a class the host holds."""
        first = (c - self.classes.start) * self.ipc
        rows = slice(first, first + self.ipc)
        syn, labels = self.syn[rows], self.syn_labels[rows]
        if self.decode is not None:
            syn, labels = self.decode(syn, labels)
        syn_aug = self._augment(syn, labels, p.t, p.k, c)
        syn_features = p.extractor.embed(syn_aug)
        real_features = self.select_real(c, p.real_features[c], syn_features, p.t)
        match = ((real_features.mean(0) - syn_features.mean(0)) ** 2).sum()
        queue_net = p.queue_net.net
        classifier = getattr(queue_net, "classifier", None)
        if p.extractor is queue_net and isinstance(classifier, nn.Module):
            logits = classifier(syn_features)
        else:
            logits = queue_net(syn_aug)
        ce_raw = F.cross_entropy(logits, labels)
        ce = ce_raw * p.ce_scale
        total = match + ce
        parts = {"match": match, "ce": ce, "ce_raw": ce_raw}
        extra = merge_losses(self.feature_losses(c, real_features, syn_features, p.t),
                             self.extra_losses(syn_aug, labels, p.t, p.extractor))
        if extra:
            total = total + sum(extra.values())
            parts.update(extra)
        parts["kept"] = int(real_features.shape[0])
        return total, parts

    def matching_pass(self, t: int, k: int, queue_net: QueueNet) -> dict[str, float]:
        """Step 3 for one queue net: per class, build its loss and step the stored images (a
        zero-gradient step for a class a sharded host does not hold). Returns the pass's sums
        over the host's classes: ``loss`` and the parts of :meth:`class_loss`, ``real`` (real
        samples drawn) and ``ce_scale``."""
        p = self.prepare_pass(t, k, queue_net)
        sums: dict[str, float] = {"loss": 0.0, "real": 0}
        for c in range(self.num_classes):
            if c not in self.classes:
                image_step(self.optimizer, self.syn, None)
                continue
            total, parts = self.class_loss(p, c)
            image_step(self.optimizer, self.syn, total)
            sums["loss"] += float(total.detach())
            sums["real"] += p.real_features[c].shape[0]
            for name, value in parts.items():
                sums[name] = sums.get(name, 0.0) + (value if isinstance(value, int)
                                                    else float(value.detach()))
        sums["ce_scale"] = p.ce_scale
        return sums

    def train_queue(self, t: int) -> list[int]:
        """Step 4: train ``fetch_net_num`` drawn queue nets on un-augmented real batches.
        Returns the queue positions trained."""
        picks = self.training_picks(t)
        n = self._train_labels.shape[0]
        for j, index in enumerate(picks):
            entry = self.queue[index]
            g = make_generator(self.seed, _TRAIN_STREAM, t, j)
            net = entry.net.train().requires_grad_(True)
            correct = torch.zeros((), dtype=torch.long, device=self.device)
            seen = 0
            for _ in range(self.model_train_steps):
                idx = torch.randperm(n, generator=g)[:self.trained_bs]
                x = self._train_images[idx].to(self.device)
                y = self._train_labels[idx].to(self.device)
                logits = net(x.contiguous(memory_format=self.memory_format))
                loss = F.cross_entropy(logits, y)
                entry.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                entry.optimizer.step()
                correct += (logits.detach().argmax(1) == y).sum()
                seen += y.numel()
            net.requires_grad_(False)
            entry.correct += int(correct)
            entry.seen += seen
        return picks

    def step(self, t: int | None = None) -> dict:
        """Run iteration ``t`` (default: the next one); return its metrics: ``loss`` (summed
        over classes and passes), ``loss_match``, ``loss_ce`` (the weighted class-aware term),
        ``loss_<name>`` for extra losses, ``ce`` (unweighted), ``ce_scale`` (ce_weight x
        accuracy of the matching net in percent; the mean over passes), ``real_kept``,
        ``trained_accuracy`` (of the nets trained, after training), ``queue_size``. The sums
        over classes are over every class also when sharded."""
        t = self.iteration if t is None else t
        self.start()
        begin = time.perf_counter()
        self.prepare_iteration(t)
        sums: dict[str, float] = {}
        picks = self.matching_picks(t)
        for k, index in enumerate(picks):
            for name, value in self.matching_pass(t, k, self.queue[index]).items():
                sums[name] = sums.get(name, 0.0) + value
        ce_scale = sums.pop("ce_scale") / len(picks)     # the same on every rank
        sums = sum_over_shards(self.shard, sums)
        real, kept = sums.pop("real"), sums.pop("kept")
        metrics = {"loss": sums.pop("loss"), "loss_match": sums.pop("match"),
                   "loss_ce": sums.pop("ce"), "ce": sums.pop("ce_raw"), "ce_scale": ce_scale}
        metrics.update({f"loss_{name}": value for name, value in sums.items()})
        metrics["real_kept"] = kept / max(real, 1)
        trained = self.train_queue(t)
        metrics["trained_accuracy"] = (sum(self.queue[i].accuracy for i in trained) /
                                       len(trained) if trained else 0.0)
        metrics["queue_size"] = len(self.queue)
        self.iteration = t + 1
        metrics["iteration"] = t
        metrics["seconds"] = time.perf_counter() - begin
        return metrics

    # -- the whole run ---------------------------------------------------------------------
    def run(self, callback: Callable[[int, dict], None] | None = None,
            progress: bool = True) -> torch.Tensor:
        """Run from :attr:`iteration` to T; ``callback(t, metrics)`` after each iteration.
        Returns the stored synthetic images (detached)."""
        return run_iterations(self, self.start, callback, progress, desc="distill (idm)")

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume: next iteration, stored images, image optimiser state
        and the model queue (weights, optimiser states, meters), all copied to the CPU; a
        sharded host's also names its classes (another shard's is refused on load)."""
        state = synthetic_state(self, _to_cpu(copy.deepcopy(self.optimizer.state_dict())))
        state["queue"] = self.queue.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        restore_synthetic(self, state)
        self.queue.load_state_dict(state["queue"])


def _flat_real(real, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All real images and labels, for the queue's training batches drawn over the whole set
    (the tensors themselves when ``real`` holds them, else one concatenation)."""
    images, labels = getattr(real, "images", None), getattr(real, "labels", None)
    if isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor):
        return images, labels.long()
    parts = [real.images_of(c) for c in range(num_classes)]
    return torch.cat(parts), torch.cat([torch.full((p.shape[0],), c, dtype=torch.long)
                                        for c, p in enumerate(parts)])
