"""Evaluation protocol: train fresh networks on a synthetic set, test on the real test set.

See docs/methods.md#evaluation-protocol. Three protocols (:data:`PROTOCOLS`):

* ``dm`` (Zhao & Bilen, CVPR 2023, ``evaluate_synset`` in the DM/DSA code): SGD lr 0.01,
  momentum 0.9, weight decay 5e-4, batch 256, 1000 epochs, lr x0.1 at half, per-image DSA
  (DM's single-op mode) on every batch.
* ``dance`` (DANCE's ``test.py`` / ``train.py``, i.e. IDC's protocol): the same SGD, batch 64,
  lr x0.2 at 2/3 and at 5/6 of the epochs, IDC's per-image augmentation (colour then crop, no
  cutout, no flip) and CutMix with probability 0.5 (lambda ~ Beta(1, 1), loss mixed by the
  pasted-area ratio).
* ``dsa-cutmix``: ``dm`` plus CutMix p 0.5; what this project called ``dance`` before
  2026-12-04 (the results of earlier sessions that say "DANCE's protocol" used this one).

Reported accuracy is always the final epoch's; no checkpoint is ever selected by test accuracy.
Differences from the reference code, deliberate: the reference loops ``range(Epoch + 1)`` with
the drop at ``Epoch // 2 + 1`` (one extra epoch); here exactly ``epochs`` epochs are run, the lr
being x0.1 from epoch ``int(lr_drop_at * epochs)`` on. All randomness (init, shuffling, DSA,
CutMix) is seeded, never from the clock.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from dm_plugins.training import accuracy, train_classifier

from .dsa import DSA, idc_per_image

__all__ = ["EvalProtocol", "PROTOCOLS", "train_and_test", "evaluate_synset", "run_seeds",
           "summarize_accuracies", "resolve_protocol"]


@dataclass(frozen=True)
class EvalProtocol:
    """Hyper-parameters of one evaluation protocol.

    ``lr_drop_at``: the lr is multiplied by ``lr_gamma`` from epoch ``int(lr_drop_at *
    epochs)`` on, unless ``lr_milestones`` is given: fractions ``(num, den)``, the lr multiplied
    by ``lr_gamma`` from epoch ``num * epochs // den`` on, for each (DANCE: (2, 3), (5, 6)).
    ``dsa``: an augmentation on every training batch: ``augmentation`` ``"dsa"`` is DM's
    per-image DSA, ``"idc"`` IDC's per-image colour then crop
    (:func:`baselines.harness.dsa.idc_per_image`). ``cutmix_p``: per-batch CutMix probability.
    """
    name: str
    epochs: int
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    lr_drop_at: float = 0.5
    dsa: bool = True
    cutmix_p: float = 0.0
    lr_milestones: Optional[Tuple[Tuple[int, int], ...]] = None
    lr_gamma: float = 0.1
    augmentation: str = "dsa"

    def milestone_epochs(self) -> List[int]:
        """The epochs (0-based) from which the lr is multiplied by ``lr_gamma`` once more."""
        if self.lr_milestones is not None:
            return [num * self.epochs // den for num, den in self.lr_milestones]
        drop = int(self.lr_drop_at * self.epochs)
        return [drop] if drop > 0 else []


PROTOCOLS: Dict[str, EvalProtocol] = {
    "dm": EvalProtocol("dm", 1000),
    "dance": EvalProtocol("dance", 1000, batch_size=64, cutmix_p=0.5,
                          lr_milestones=((2, 3), (5, 6)), lr_gamma=0.2, augmentation="idc"),
    "dsa-cutmix": EvalProtocol("dsa-cutmix", 1000, cutmix_p=0.5),
}


def resolve_protocol(protocol: Union[str, EvalProtocol], epochs: Optional[int]) -> EvalProtocol:
    """The :class:`EvalProtocol` named (or given), with ``epochs`` when not None."""
    if isinstance(protocol, str):
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; known: {sorted(PROTOCOLS)}")
        protocol = PROTOCOLS[protocol]
    if epochs is not None:
        protocol = EvalProtocol(**{**asdict(protocol), "epochs": int(epochs)})
    return protocol


def train_and_test(network_factory: Callable[[], nn.Module], images: Tensor, labels: Tensor,
                   test_images: Tensor, test_labels: Tensor, protocol: Union[str, EvalProtocol],
                   generator: torch.Generator, device: Union[str, torch.device] = "cpu",
                   augment: Optional[DSA] = None, progress: bool = True, desc: str = "",
                   channels_last: bool = False, compile: bool = False) -> float:
    """Train one fresh network on a synthetic set and return its final-epoch test accuracy (%).

    Args:
        network_factory: builds a fresh network (called once; its init uses the global torch
            RNG, so seed it around this call, as :func:`evaluate_synset` does).
        images: (N, C, H, W) synthetic images, already decoded and normalised.
        labels: (N,) long class indices or (N, K) float soft targets.
        test_images, test_labels: the real test set (normalised images, long labels).
        protocol: an :class:`EvalProtocol` or a name in :data:`PROTOCOLS`.
        generator: CPU generator driving shuffling, DSA and CutMix.
        augment: the DSA used when ``protocol.dsa`` with ``augmentation="dsa"``
            (``augment.per_image`` on every batch); ``None`` means the default ``DSA()`` (pass
            ``DSA(flip=False)`` for digit-like data). Ignored otherwise (IDC's colour-crop has
            no flip).
        progress: show a tqdm bar over epochs.
        compile: train through ``torch.compile`` (see :func:`dm_plugins.training.train_classifier`).

    Training: SGD(lr, momentum, weight_decay), lr x``lr_gamma`` from each of
    :meth:`EvalProtocol.milestone_epochs`, reshuffled batches of ``batch_size``, the
    augmentation then (with prob ``cutmix_p``) CutMix per batch.
    Testing: eval mode, no grad, batches of 1000; accuracy of the last epoch's weights.
    """
    protocol = resolve_protocol(protocol, None)
    per_image = None
    if protocol.dsa and protocol.augmentation == "idc":
        per_image = idc_per_image("color_crop")
    elif protocol.dsa:
        per_image = (augment if augment is not None else DSA()).per_image
    net = network_factory()
    targets = labels.detach().float() if labels.is_floating_point() else labels.detach().long()
    train_classifier(
        net, images.detach().float(), targets, epochs=protocol.epochs, lr=protocol.lr,
        momentum=protocol.momentum, weight_decay=protocol.weight_decay,
        batch_size=protocol.batch_size, lr_milestones=protocol.milestone_epochs(),
        lr_gamma=protocol.lr_gamma, augment=per_image, cutmix_p=protocol.cutmix_p,
        generator=generator, device=device, progress=progress, desc=desc or protocol.name,
        channels_last=channels_last, compile=compile)
    return accuracy(net, test_images.float(), test_labels, device)


def run_seeds(seed: int, run: int):
    """(init_seed, data_seed) of run ``run``: independent 63-bit seeds derived from
    ``(seed, run)`` with numpy's SeedSequence (deterministic, no clock)."""
    a, b = np.random.SeedSequence([int(seed), int(run)]).generate_state(2, dtype=np.uint64)
    return int(a) >> 1, int(b) >> 1


def evaluate_synset(images: Tensor, labels: Tensor, dataset_test_images: Tensor,
                    dataset_test_labels: Tensor,
                    arch_factory: Union[Callable[[], nn.Module], str], runs: int = 5,
                    protocol: Union[str, EvalProtocol] = "dm", epochs: Optional[int] = None,
                    seed: int = 0, device: Union[str, torch.device] = "cpu",
                    augment: Optional[DSA] = None, progress: bool = True,
                    num_classes: Optional[int] = None, channels: Optional[int] = None,
                    image_size: Optional[int] = None, net_kwargs: Optional[dict] = None,
                    channels_last: bool = False, compile: bool = False,
                    run_indices: Optional[Sequence[int]] = None,
                    on_run: Optional[Callable[[int, float], None]] = None) -> dict:
    """Evaluate a synthetic set: ``runs`` fresh networks, mean and std of final-epoch accuracy.

    Args:
        images, labels: the (decoded, normalised) synthetic set; labels hard (N,) or soft (N, K).
        dataset_test_images, dataset_test_labels: the real test set (normalised).
        arch_factory: a zero-argument callable building the network, or a name for
            ``baselines.harness.networks.get_network`` (``convnet``, ``resnet10``, ...); for a
            name, ``channels`` and ``image_size`` default to the images' shape and
            ``num_classes`` to the soft-label width or ``max(label) + 1`` over synthetic and
            test labels; ``net_kwargs`` are passed on.
        runs: number of independent runs.
        protocol: name in :data:`PROTOCOLS` or an :class:`EvalProtocol`; ``epochs`` overrides it.
        seed: run ``i`` uses the seeds :func:`run_seeds` ``(seed, i)``: the first seeds the
            global torch RNG (forked, so the caller's RNG state is untouched) for network init,
            the second a CPU generator for shuffling, DSA and CutMix.
        augment: DSA for training (see :func:`train_and_test`).
        channels_last: train in channels-last memory format (faster on CPU; same maths).
        compile: train each network through ``torch.compile`` (a one-off compile time per run,
            then faster epochs; the same maths up to float rounding).
        run_indices: run only these of the ``runs`` runs (each still seeded by its own index,
            so the runs of a set split over processes give exactly the accuracies of one
            process running them all); the result then also holds ``run_indices`` and its
            mean/std are over these runs only (combine the parts with
            :func:`summarize_accuracies`).
        on_run: called as ``on_run(i, accuracy)`` when run ``i`` finishes (progress lines).

    Returns:
        ``{"accuracy_mean", "accuracy_std", "accuracies", "protocol", "epochs", "runs"}``;
        accuracies in percent; ``accuracy_std`` is the population std (numpy ``ddof=0``, as the
        DM code reports).
    """
    proto = resolve_protocol(protocol, epochs)
    if isinstance(arch_factory, str):
        from .networks import get_network

        name = arch_factory
        if num_classes is None:
            if labels.is_floating_point() and labels.dim() == 2:
                num_classes = labels.shape[1]
            else:
                num_classes = int(max(labels.max(), dataset_test_labels.max())) + 1
        channels = channels if channels is not None else images.shape[1]
        image_size = image_size if image_size is not None else images.shape[-1]
        kwargs = dict(net_kwargs or {})

        def factory() -> nn.Module:
            return get_network(name, channels, num_classes, image_size, **kwargs)
    else:
        name = getattr(arch_factory, "__name__", "network")
        factory = arch_factory

    device = torch.device(device)
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    accuracies = []
    indices = list(range(runs)) if run_indices is None else [int(i) for i in run_indices]
    for i in indices:
        init_seed, data_seed = run_seeds(seed, i)
        generator = torch.Generator().manual_seed(data_seed)
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(init_seed)
            acc = train_and_test(factory, images, labels, dataset_test_images,
                                 dataset_test_labels, proto, generator, device=device,
                                 augment=augment, progress=progress,
                                 desc=f"{name} run {i + 1}/{runs}",
                                 channels_last=channels_last, compile=compile)
        accuracies.append(acc)
        if on_run is not None:
            on_run(i, acc)
    result = summarize_accuracies(accuracies, proto, runs)
    if run_indices is not None:
        result["run_indices"] = indices
    return result


def summarize_accuracies(accuracies: Sequence[float], protocol: EvalProtocol, runs: int) -> dict:
    """What :func:`evaluate_synset` returns for these final-epoch ``accuracies`` (in run
    order): mean, population std (``nan`` for none), the accuracies, protocol, epochs, runs."""
    arr = np.asarray(accuracies, dtype=np.float64)
    return {
        "accuracy_mean": float(arr.mean()) if len(arr) else float("nan"),
        "accuracy_std": float(arr.std(ddof=0)) if len(arr) else float("nan"),
        "accuracies": [float(a) for a in accuracies],
        "protocol": protocol.name,
        "epochs": protocol.epochs,
        "runs": runs,
    }
