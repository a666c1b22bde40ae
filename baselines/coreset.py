#!/usr/bin/env python
"""Coreset baselines: real images as the "synthetic" set, in the harness file format.

Usage (from the repo root)::

    python baselines/coreset.py --method random  --ipc 10 --out runs/random
    python baselines/coreset.py --method herding --ipc 10 --out runs/herding
    python baselines/coreset.py --method kcenter --ipc 10 --network expert_0.pt --out runs/kc

``random``: IPC random real images per class (the "random real" row of distillation tables).
``herding`` and ``kcenter``: IPC real images per class chosen greedily on the embeddings
(``net.embed(x)``, the feature layer) of a trained network, class by class
(``baselines/methods/coresets.py`` states both rules). The network is expert ``--expert-index``
of the shared expert pool (the one ``baselines/dm.py`` uses with the same ``--arch``,
``--expert-epochs``, ``--expert-recipe`` and seed; trained and cached if missing, or read from
``--experts DIR``), or the network in ``--network FILE`` (an ``expert_<k>.pt`` file of a pool, or
a plain state dict of the ``--arch`` network). The set is written as ``OUT/synthetic.pt`` +
``OUT/grid.png``, so ``baselines/evaluate.py`` evaluates it exactly like a distilled set; the
chosen training-set indices and the network are recorded in the set's ``meta["config"]``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from baselines.harness.cpu_threads import prefer_passive_wait  # noqa: E402

prefer_passive_wait()  # before torch loads OpenMP: passive wait when other jobs hold the cores

METHODS = ("random", "herding", "kcenter")
_EMBED_BATCH = 512


def build_parser() -> argparse.ArgumentParser:
    from baselines.harness.expert_cache import DEFAULT_RECIPE, RECIPES
    from baselines.harness.driver import DefaultsOnceFormatter
    from baselines.harness.validation import OneLineParser
    p = OneLineParser(prog="baselines/coreset.py", description=__doc__.split("\n\n")[0],
                      formatter_class=DefaultsOnceFormatter)
    p.add_argument("--method", choices=METHODS, default="random", help="coreset selection")
    p.add_argument("--dataset", default="digits", help="any harness dataset name")
    p.add_argument("--data-path", default="data", help="where downloadable datasets live")
    p.add_argument("--ipc", type=int, default=10, help="images per class")
    p.add_argument("--seed", type=int, default=0,
                   help="selection seed (random); herding and kcenter are deterministic given "
                        "the network, whose expert pool is keyed by --expert-seed")
    p.add_argument("--out", required=True, help="output directory (synthetic.pt, grid.png)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the synthetic set of an existing --out (never done otherwise)")
    g = p.add_argument_group("the embedding network (herding, kcenter)")
    g.add_argument("--arch", default="convnet", help="network architecture")
    g.add_argument("--network", default=None, metavar="FILE",
                   help="a trained network: an expert_<k>.pt file or a state dict of --arch "
                        "(default: expert --expert-index of the expert pool)")
    g.add_argument("--experts", default=None, metavar="DIR",
                   help="expert directory, trained and saved there if empty (default: the "
                        "cache entry under ./experts keyed by dataset, arch, epochs, seed and "
                        "recipe, shared with the distillation runs; env DM_PLUGINS_EXPERTS "
                        "moves the cache root)")
    g.add_argument("--expert-index", type=int, default=0, help="which expert of the pool")
    g.add_argument("--expert-epochs", type=int, default=None,
                   help="epochs per expert (default: baselines/dm.py's, 70; 15 on digits)")
    g.add_argument("--expert-recipe", choices=sorted(RECIPES), default=DEFAULT_RECIPE,
                   help="how experts are trained (see baselines/dm.py --help)")
    g.add_argument("--expert-seed", type=int, default=None,
                   help="the expert pool's seed (default: --seed)")
    g.add_argument("--device", default="auto", help="cpu, cuda or auto")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _check_out(out: str, overwrite: bool) -> None:
    """Never overwrite a run: refuse an --out that is a file or already holds a synthetic set or
    a distillation run, unless --overwrite (which replaces only a coreset's own files)."""
    from baselines.harness.common import UsageError
    from baselines.harness.paths import check_writable_dir
    path = Path(out)
    check_writable_dir("--out", path)   # a file in the way, under a file, a read-only place
    if (path / "config.json").exists():
        raise UsageError(f"--out {out} holds a distillation run (config.json); choose another "
                         f"--out")
    if (path / "synthetic.pt").exists() and not overwrite:
        raise UsageError(f"--out {out} already holds a synthetic set; choose another --out or "
                         f"pass --overwrite to replace it")


def _check_network_flags(args: argparse.Namespace) -> None:
    """The embedding-network flags, checked before any data is loaded."""
    from baselines.harness.common import UsageError
    from baselines.harness.networks import available_networks
    if args.method == "random":
        for flag, value in (("--network", args.network), ("--experts", args.experts)):
            if value is not None:
                raise UsageError(f"{flag} applies to --method herding and kcenter only")
        return
    if args.network is not None and args.experts is not None:
        raise UsageError("give --network FILE or --experts DIR, not both")
    if args.network is not None and not Path(args.network).is_file():
        raise UsageError(f"--network {args.network} is not a file")
    if args.experts is not None and Path(args.experts).exists() \
            and not Path(args.experts).is_dir():
        raise UsageError(f"--experts {args.experts} is a file; give a directory")
    if args.expert_index < 0:
        raise UsageError(f"--expert-index must be >= 0, got {args.expert_index}")
    if args.experts is not None and Path(args.experts).is_dir():
        from baselines.harness.expert_cache import cached_expert_count
        held = cached_expert_count(args.experts)
        if held and args.expert_index >= held:
            raise UsageError(f"--expert-index {args.expert_index} is outside the pool in "
                             f"{args.experts}, which holds {held} expert(s); use 0 to "
                             f"{held - 1}")
    if args.expert_epochs is not None and args.expert_epochs < 1:
        raise UsageError(f"--expert-epochs must be >= 1, got {args.expert_epochs}")
    if args.arch not in available_networks():
        raise UsageError(f"--arch: unknown network {args.arch!r}; choose from "
                         f"{', '.join(available_networks())}")


def expert_epochs(args: argparse.Namespace, dataset_name: str) -> int:
    """``--expert-epochs``, else what ``baselines/dm.py`` resolves by default (so both share
    one cache entry): its embedded budget on digits, its method default elsewhere."""
    from baselines import dm
    from baselines.harness.driver import EMBEDDED
    if args.expert_epochs is not None:
        return args.expert_epochs
    if dataset_name == EMBEDDED:
        return int(dm.SPEC.embedded_budget["expert_epochs"])
    return int(dm.DEFAULTS["expert_epochs"])


def load_network(path: str, factory):
    """The ``factory()`` network with the weights in ``path`` (an expert file of a pool, or a
    plain state dict), in eval mode; a file that does not fit is a UsageError."""
    import torch

    from baselines.harness.common import UsageError
    from dm_plugins.wrapping import strip_wrapper_prefixes
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same message
        raise UsageError(f"--network {path} is unreadable ({type(exc).__name__})") from None
    state = blob.get("trained", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise UsageError(f"--network {path} holds no state dict")
    net = factory()
    try:
        net.load_state_dict(strip_wrapper_prefixes(state))
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"--network {path} does not fit --arch "
                         f"({str(exc).splitlines()[0]})") from None
    return net.eval().requires_grad_(False)


def embed(net, images, device) -> "torch.Tensor":
    """``net.embed`` of every image, in batches, on CPU."""
    import torch
    with torch.no_grad():
        return torch.cat([net.embed(images[i:i + _EMBED_BATCH].to(device)).flatten(1).cpu()
                          for i in range(0, len(images), _EMBED_BATCH)])


def select(dataset, features, ipc: int, method: str) -> "torch.Tensor":
    """Global training-set indices: ``ipc`` per class, class by class, in selection order."""
    import torch

    from baselines.methods.coresets import SELECTORS
    chosen = []
    for c in range(dataset.num_classes):
        members = torch.nonzero(dataset.train.labels == c, as_tuple=True)[0]
        chosen.append(members[SELECTORS[method](features[members], ipc)])
    return torch.cat(chosen)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from baselines.harness import expert_cache
    from baselines.harness.common import (check_ipc, initial_synthetic, resolve_device,
                                          save_synthetic)
    from baselines.harness.datasets import canonical_dataset_name, load_dataset
    from baselines.harness.errors import USER_ERRORS
    from baselines.harness.networks import get_network
    from baselines.harness.runs import RunDir
    try:
        _check_out(args.out, args.overwrite)
        _check_network_flags(args)
        device = resolve_device(args.device)
        args.dataset = canonical_dataset_name(args.dataset)
        dataset = load_dataset(args.dataset, args.data_path)
        check_ipc(dataset, args.ipc, 1, "real")
        config = {"method": args.method, "dataset": dataset.name, "ipc": args.ipc,
                  "seed": args.seed}
        if args.method == "random":
            stored = initial_synthetic(dataset, args.ipc, 1, "real", args.seed)
        else:
            def factory():
                return get_network(args.arch, dataset.channels, dataset.num_classes,
                                   dataset.image_size)
            config["arch"] = args.arch
            if args.network is not None:
                net = load_network(args.network, factory).to(device)
                config["network"] = os.path.abspath(args.network)
            else:
                seed = args.seed if args.expert_seed is None else args.expert_seed
                epochs = expert_epochs(args, dataset.name)
                pool, path = expert_cache.load_or_train_experts(
                    dataset, args.arch, num_experts=args.expert_index + 1, epochs=epochs,
                    seed=seed, directory=args.experts, recipe=args.expert_recipe,
                    device=device, progress=not args.no_progress)
                net = pool.trained_network(args.expert_index, device)
                accuracy = pool.experts[args.expert_index].meta.get("test_accuracy")
                config.update({"experts": None if path is None else str(path),
                               "expert_index": args.expert_index, "expert_epochs": epochs,
                               "expert_recipe": args.expert_recipe, "expert_seed": seed})
                if accuracy is not None:
                    config["expert_test_accuracy"] = [accuracy]
            indices = select(dataset, embed(net, dataset.train.images, device), args.ipc,
                             args.method)
            config["indices"] = indices.tolist()
            stored = dataset.train.images[indices]
        os.makedirs(args.out, exist_ok=True)
        save_synthetic(RunDir(args.out), dataset, stored, ipc=args.ipc, factor=1,
                       method=f"coreset-{args.method}", plugins=[], config=config, seed=args.seed)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {os.path.join(args.out, 'synthetic.pt')} ({args.ipc} {args.method} real images "
          f"per class of {dataset.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
