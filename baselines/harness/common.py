"""Small pieces every baseline's command line needs: device choice, synthetic-set initialisation,
and the final evaluate-and-save step."""
from __future__ import annotations

from typing import Callable

import torch

from dm_plugins.seeding import make_generator

from .datasets import Dataset
from .dsa import DSA
from .evaluation import evaluate_synset, resolve_protocol, summarize_accuracies
from .factorization import decode, mosaic_init
from .synset import save_grid, save_synset

_INIT_STREAM = 0x1417


class UsageError(Exception):
    """Settings that cannot work together (one-line message saying what to change)."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; ``cuda`` without a GPU is a UsageError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is available; "
                         "use --device cpu or auto")
    return torch.device(name)


def check_ipc(dataset: Dataset, ipc: int, factor: int, init: str) -> None:
    """Real initialisation needs ``ipc * factor^2`` distinct real images of every class."""
    if ipc < 1:
        raise UsageError(f"--ipc must be >= 1, got {ipc}")
    if factor < 1:
        raise UsageError(f"--factor must be >= 1, got {factor}")
    if init == "real":
        need = ipc * factor * factor
        sizes = dataset.train.class_sizes()
        smallest = min(range(len(sizes)), key=sizes.__getitem__)
        if sizes[smallest] < need:
            name = dataset.class_names[smallest] if dataset.class_names else smallest
            raise UsageError(
                f"--ipc {ipc} with --factor {factor} needs {need} real images per class to "
                f"initialise from, but class {name!r} has only {sizes[smallest]}; lower --ipc "
                f"or --factor, or use --init noise")


def initial_synthetic(dataset: Dataset, ipc: int, factor: int, init: str, seed: int
                      ) -> torch.Tensor:
    """Stored synthetic images (C * ipc, ...), normalised, sorted by class.

    ``real``: random real images of each class (with factor f, each stored image a mosaic of
    f*f of them); ``noise``: standard normal in normalised space.
    """
    g = make_generator(seed, _INIT_STREAM)
    if init == "noise":
        shape = (dataset.num_classes * ipc, dataset.channels, dataset.image_size,
                 dataset.image_size)
        return torch.randn(shape, generator=g)
    if init != "real":
        raise UsageError(f"--init must be 'real' or 'noise', got {init!r}")
    per_class = [dataset.train.sample(c, ipc * factor * factor, g).cpu()
                 for c in range(dataset.num_classes)]
    if factor == 1:
        return torch.cat(per_class)
    return torch.cat([mosaic_init(x, factor) for x in per_class])


def synthetic_labels(num_classes: int, ipc: int) -> torch.Tensor:
    return torch.arange(num_classes).repeat_interleave(ipc)


def save_synthetic(run_dir, dataset: Dataset, stored: torch.Tensor, *, ipc: int, factor: int,
                   method: str, plugins: list[str], config: dict, seed: int,
                   path=None, grid_path=None, extra_meta: dict | None = None) -> None:
    """Write ``synthetic.pt`` (pixel space) and ``grid.png`` (decoded images) in the run dir;
    ``path`` / ``grid_path`` write them elsewhere (a snapshot: ``grid_path`` None writes no
    grid), ``extra_meta`` adds to the set's meta."""
    labels = synthetic_labels(dataset.num_classes, ipc)
    pixels = dataset.denormalize(stored.detach().cpu()).clamp(0, 1)
    save_synset(path or run_dir.synset_path, pixels, labels, {
        "dataset": dataset.name, "mean": list(dataset.mean), "std": list(dataset.std),
        "ipc": ipc, "factor": factor, "method": method, "plugins": plugins, "config": config,
        "seed": seed, "num_classes": dataset.num_classes,
        "class_names": list(dataset.class_names), **(extra_meta or {})})
    if path is not None and grid_path is None:
        return
    decoded, decoded_labels = decode(pixels, labels, factor) if factor > 1 else (pixels, labels)
    save_grid(grid_path or run_dir.grid_path, decoded.clamp(0, 1), decoded_labels)


def evaluate_stored(dataset: Dataset, stored: torch.Tensor, *, ipc: int, factor: int,
                    archs: list[str], runs: int, epochs: int, protocol: str, seed: int,
                    device: torch.device, progress: bool, channels_last: bool = False,
                    compile: bool = False, log: Callable[[str], None] = print, rank: int = 0, world_size: int = 1,
                    gather: Callable[[object], list] | None = None) -> list[dict]:
    """Evaluate the stored synthetic images (normalised) on every architecture.

    The images are clamped to the valid pixel range first, exactly as they are saved, so the
    accuracy reported is the accuracy of the file on disk.

    Spread over processes (``world_size > 1``): the ``archs x runs`` evaluation runs are dealt
    round-robin, rank ``rank`` training every ``world_size``-th; ``gather(obj)`` must return
    every rank's ``obj`` in rank order (e.g. :func:`dm_plugins.distributed.all_gather_object`).
    Each run is seeded by its own index, so every rank returns exactly the results of one
    process running them all.
    """
    labels = synthetic_labels(dataset.num_classes, ipc)
    images = dataset.normalize(dataset.denormalize(stored.detach().cpu()).clamp(0, 1))
    if factor > 1:
        images, labels = decode(images, labels, factor)

    from dm_plugins.heartbeat import Heartbeat
    total = len(archs) * runs if world_size == 1 else len(range(rank, len(archs) * runs,
                                                                  world_size))
    beat = Heartbeat(log, "evaluation run", total, unit="run") if not progress else None
    finished = [0]

    def on_run(arch: str, i: int, accuracy: float) -> None:
        finished[0] += 1
        if beat is not None:
            beat(finished[0], arch=arch, run=i + 1, accuracy=round(accuracy, 2))

    def evaluate(arch: str, run_indices=None) -> dict:
        return evaluate_synset(
            images, labels, dataset.test.images, dataset.test.labels, arch, runs=runs,
            protocol=protocol, epochs=epochs, seed=seed, device=device,
            augment=DSA(flip=not dataset.is_digit_like), progress=progress,
            num_classes=dataset.num_classes, channels=dataset.channels,
            image_size=dataset.image_size, channels_last=channels_last, compile=compile,
            run_indices=run_indices, on_run=lambda i, acc: on_run(arch, i, acc))

    if world_size > 1:
        if gather is None:
            raise ValueError("evaluate_stored: world_size > 1 needs gather")
        mine = [(k, i) for k in range(len(archs)) for i in range(runs)][rank::world_size]
        done = []
        for k, arch in enumerate(archs):
            indices = [i for a, i in mine if a == k]
            if indices:
                accuracies = evaluate(arch, indices)["accuracies"]
                done += [(k, i, acc) for i, acc in zip(indices, accuracies)]
        everything = sorted(x for part in gather(done) for x in part)
        proto = resolve_protocol(protocol, epochs)
        per_arch = [summarize_accuracies([acc for a, _, acc in everything if a == k], proto, runs)
                    for k in range(len(archs))]
    results = []
    for k, arch in enumerate(archs):
        res = per_arch[k] if world_size > 1 else evaluate(arch)
        res["arch"] = arch
        log(f"evaluation {arch}: {res['accuracy_mean']:.2f} +- {res['accuracy_std']:.2f} "
            f"over {runs} runs ({protocol} protocol, {res['epochs']} epochs, last epoch)")
        results.append(res)
    return results
