#!/usr/bin/env python
"""Expert recipes compared at equal CPU time: which recipe gives the stronger experts for PTM,
PLM and DANCE when the budget is the same?

1. **Probe**: for each recipe, train a fresh network for ``--probe-epochs`` epochs and time it
   (recipes round-robin, same thread count), giving seconds per epoch.
2. **Budget**: ``--budget-epochs`` epochs of ``--budget-recipe``; every recipe gets
   ``round(budget seconds / its seconds per epoch)`` epochs (at least 1).
3. **Train**: each recipe's pool through the shared expert cache (``experts/`` or
   ``$DM_PLUGINS_EXPERTS``), so the pools are reused by the CLIs with
   ``--expert-recipe R --expert-epochs E``. A pool already cached is loaded, not retrained; its
   training time is then the probe's estimate, and the table says so.

Prints one row per recipe (epochs, seconds, each expert's test accuracy, mean) and writes JSON.
It measures; it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from baselines.harness.cpu_threads import prefer_passive_wait  # noqa: E402

prefer_passive_wait()  # before torch loads OpenMP, as every command line does

import torch  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from baselines.harness.expert_cache import RECIPES
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="imagefolder:data/cifar10-mini")
    p.add_argument("--data-path", default="data")
    p.add_argument("--arch", default="convnet")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma list of recipes")
    p.add_argument("--budget-recipe", default="ptlm")
    p.add_argument("--budget-epochs", type=int, default=15)
    p.add_argument("--probe-epochs", type=int, default=1)
    p.add_argument("--num-experts", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default="benchmarks/results/expert_recipes.json")
    p.add_argument("--no-progress", action="store_true")
    return p


def seconds_per_epoch(recipe: str, data, factory, epochs: int, seed: int) -> float:
    """Seconds per epoch of ``recipe``, from training a fresh network ``epochs`` epochs."""
    from baselines.harness.expert_cache import recipe_arguments
    from dm_plugins.seeding import make_generator
    from dm_plugins.training import train_classifier
    settings = recipe_arguments(recipe, epochs, data)
    settings.pop("augment_name")
    torch.manual_seed(seed)
    net = factory()
    start = time.perf_counter()
    train_classifier(net, data.train.images, data.train.labels, epochs=epochs,
                     generator=make_generator(seed, 99), progress=False, channels_last=True,
                     **settings)
    return (time.perf_counter() - start) / epochs


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from baselines.harness.datasets import canonical_dataset_name, load_dataset
    from baselines.harness.expert_cache import RECIPES, load_or_train_experts
    from baselines.harness.networks import get_network

    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    bad = [r for r in recipes + [args.budget_recipe] if r not in RECIPES]
    if bad or args.budget_epochs < 1 or args.probe_epochs < 1 or args.num_experts < 1:
        print(f"error: unknown recipe {bad[0]!r}" if bad else
              "error: --budget-epochs, --probe-epochs and --num-experts must be >= 1",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset(canonical_dataset_name(args.dataset), args.data_path)

    def factory():
        return get_network(args.arch, data.channels, data.num_classes, data.image_size)

    probe = {r: seconds_per_epoch(r, data, factory, args.probe_epochs, args.seed)
             for r in dict.fromkeys(recipes + [args.budget_recipe])}
    budget = args.budget_epochs * probe[args.budget_recipe]
    print(f"threads {torch.get_num_threads()}; probe ({args.probe_epochs} epoch(s) each): "
          + ", ".join(f"{r} {s:.1f} s/epoch" for r, s in probe.items()))
    print(f"budget: {args.budget_epochs} epochs of {args.budget_recipe} = {budget:.0f} s per expert")

    rows = []
    for r in recipes:
        epochs = max(1, round(budget / probe[r]))
        start = time.perf_counter()
        lines: list[str] = []
        pool, path = load_or_train_experts(data, args.arch, num_experts=args.num_experts,
                                           epochs=epochs, seed=args.seed, recipe=r,
                                           progress=not args.no_progress, channels_last=True,
                                           log=lambda s: (lines.append(s), print(s)))
        trained = any("trained" in s for s in lines)
        seconds = (time.perf_counter() - start) / args.num_experts if trained else epochs * probe[r]
        accs = [e.meta.get("test_accuracy", float("nan")) for e in pool.experts]
        rows.append({"recipe": r, "epochs": epochs, "seconds_per_expert": seconds,
                     "timed": "trained now" if trained else "cached (probe estimate)",
                     "test_accuracy": accs, "mean": statistics.fmean(accs), "path": str(path)})

    print(f"\n| recipe | epochs | s per expert | expert test accuracy (%) | mean |\n|---|---:|---:|---|---:|")
    for row in rows:
        print(f"| {row['recipe']} | {row['epochs']} | {row['seconds_per_expert']:.0f} "
              f"({row['timed']}) | {', '.join(f'{a:.1f}' for a in row['test_accuracy'])} "
              f"| {row['mean']:.2f} |")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv[1:], "threads": torch.get_num_threads(),
                       "probe_seconds_per_epoch": probe, "budget_seconds": budget,
                       "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
