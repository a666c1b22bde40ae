"""One supervised training loop, shared by expert training and synthetic-set evaluation."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is a declared dependency
    tqdm = None


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_k targets_k * log_softmax(logits)_k``.

    ``targets`` may be class indices (long, (N,)) or probability vectors (float, (N, K)).
    """
    if targets.dtype in (torch.long, torch.int64, torch.int32):
        return F.cross_entropy(logits, targets.long())
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def cutmix(x: torch.Tensor, targets: torch.Tensor, num_classes: int, generator: torch.Generator
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix (Yun et al., 2019) with Beta(1, 1) area: paste a box of a shuffled batch.

    Returns mixed images and soft targets (N, K) mixed by the pasted area.
    """
    n, _, h, w = x.shape
    soft = targets if targets.dtype.is_floating_point else F.one_hot(targets.long(), num_classes).float()
    perm = torch.randperm(n, generator=generator).to(x.device)
    lam = float(torch.rand((), generator=generator))
    cut_h, cut_w = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
    cy = int(torch.randint(h, (), generator=generator))
    cx = int(torch.randint(w, (), generator=generator))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    mixed = x.clone()
    mixed[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
    area = (y1 - y0) * (x1 - x0) / (h * w)
    return mixed, (1 - area) * soft + area * soft[perm.to(soft.device)]


def train_classifier(network: nn.Module, images: torch.Tensor, targets: torch.Tensor, *,
                     epochs: int, lr: float = 0.01, momentum: float = 0.9,
                     weight_decay: float = 5e-4, batch_size: int = 256,
                     lr_milestones: Sequence[int] = (), lr_gamma: float = 0.1,
                     augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                     cutmix_p: float = 0.0, generator: torch.Generator,
                     device: str | torch.device = "cpu", progress: bool = True,
                     desc: str = "train", channels_last: bool = False,
                     compile: bool = False,
                     on_epoch: Callable[[int, float, float], None] | None = None) -> float:
    """Train ``network`` in place with SGD and return the final epoch's training accuracy (%).

    Args:
        images: normalised training images (N, C, H, W), on any device.
        targets: class indices (N,) or soft targets (N, K).
        lr_milestones: epochs at which the learning rate is multiplied by ``lr_gamma``.
        augment: ``augment(batch, generator)`` applied to every batch (e.g. per-image DSA).
        cutmix_p: probability of applying CutMix to a batch.
        generator: CPU generator for shuffling, augmentation and CutMix draws.
        channels_last: train in channels-last memory format (faster on CPU; same maths).
        compile: run the network's forward (and so its backward) through ``torch.compile``:
            a one-off compile time (tens of seconds on CPU), then faster epochs; the same
            maths up to float rounding. ``network`` itself is trained either way.
        on_epoch: called as ``on_epoch(epochs_done, mean_loss, train_accuracy)`` after each
            epoch (progress lines where bars are off).
    """
    device = torch.device(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    network.to(device, memory_format=memory_format).train()
    images, targets = images.to(device), targets.to(device)
    num_classes = targets.shape[1] if targets.ndim == 2 else int(targets.max()) + 1
    opt = torch.optim.SGD(network.parameters(), lr=lr, momentum=momentum,
                          weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(lr_milestones),
                                                 gamma=lr_gamma)
    forward = torch.compile(network) if compile else network
    n = images.shape[0]
    bar = tqdm(range(epochs), desc=desc, leave=False, disable=not progress or tqdm is None)
    correct = 0
    for epoch in bar:
        correct, loss_sum = 0, 0.0
        perm = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            x, y = images[idx], targets[idx]
            if augment is not None:
                x = augment(x, generator)
            if cutmix_p > 0 and float(torch.rand((), generator=generator)) < cutmix_p:
                x, y = cutmix(x, y, num_classes, generator)
            logits = forward(x.contiguous(memory_format=memory_format))
            loss = soft_cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            hard = y.argmax(1) if y.ndim == 2 else y
            correct += int((logits.argmax(1) == hard).sum())
            if on_epoch is not None:
                loss_sum += float(loss.detach()) * idx.numel()
        sched.step()
        bar.set_postfix(acc=f"{100.0 * correct / n:.1f}")
        if on_epoch is not None:
            on_epoch(epoch + 1, loss_sum / n, 100.0 * correct / n)
    return 100.0 * correct / n


@torch.no_grad()
def accuracy(network: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             device: str | torch.device = "cpu", batch_size: int = 1000) -> float:
    """Top-1 accuracy (%) of ``network`` in eval mode; restores its previous mode."""
    was_training = network.training
    network.eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device)
        y = labels[start:start + batch_size].to(device)
        correct += int((network(x).argmax(1) == y).sum())
    network.train(was_training)
    return 100.0 * correct / max(images.shape[0], 1)
