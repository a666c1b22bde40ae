#!/usr/bin/env python
"""DM (Zhao & Bilen, 2023) with optional PTLM plugins: ``python baselines/dm.py --plugins cap,ptm,plm``.

Runs distillation on the harness (datasets, ConvNet, DSA, factorisation), writes a run
directory (see ``baselines/harness/runs.py``), then evaluates the synthetic set.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

EMBEDDED = "digits"

# Defaults that depend on other settings; None on the command line means "resolve".
DM_ITERATIONS, EMBEDDED_ITERATIONS = 20000, 100
DM_BATCH_REAL, EMBEDDED_BATCH_REAL = 256, 64
DM_EVAL_EPOCHS, EMBEDDED_EVAL_EPOCHS = 1000, 300
DM_EVAL_RUNS, EMBEDDED_EVAL_RUNS = 5, 1
PTLM_EXPERTS, EMBEDDED_EXPERTS = 5, 2
PTLM_EXPERT_EPOCHS, EMBEDDED_EXPERT_EPOCHS = 70, 15


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="baselines/dm.py",
        description="Distribution matching (DM) with optional PTLM plugins: capacity matching "
                    "(cap), pseudo-trajectory matching (ptm), pseudo-label matching (plm). "
                    "Defaults follow the DM paper with --plugins none and the PTLM settings "
                    "(factor 2, image lr 0.01 x IPC in pixel space, 5 experts x 70 epochs) when "
                    "any plugin is on. On the embedded 'digits' set some defaults are smaller so "
                    "a run takes minutes on a CPU; those are marked [embedded].",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--dataset", default=EMBEDDED,
      help="digits (embedded, offline), mnist, fashion-mnist, cifar10, cifar100, tinyimagenet, "
           "imagenette/imagewoof/imagemeow/imagesquawk/imagefruit/imageyellow, or "
           "imagefolder:PATH (PATH/train/<class>/*, PATH/test/<class>/*)")
    a("--data-path", default="data", help="where torchvision/TinyImageNet/ImageNet files live")
    a("--ipc", type=int, default=10, help="stored synthetic images per class")
    a("--iterations", type=int, default=None,
      help=f"distillation iterations T (default {DM_ITERATIONS}; [embedded] {EMBEDDED_ITERATIONS})")
    a("--plugins", default="none",
      help="comma list of cap, ptm, plm (or third-party names), or 'none' for plain DM")
    a("--alpha", type=int, default=50, help="cap: IPC threshold between typical and diverse mode")
    a("--lam", type=float, default=1.0, help="ptm: lambda >= 1; injection ratio r = (t/lambda)/T")
    a("--tau", type=float, default=0.1, help="plm: sharpening temperature")
    a("--experts", default=None,
      help="expert directory for ptm/plm; trained and saved there if empty (default: a cache "
           "entry under ./experts keyed by dataset, arch, epochs, seed; env DM_PLUGINS_EXPERTS "
           "moves the cache root)")
    a("--num-experts", type=int, default=None,
      help=f"experts to train/use (default {PTLM_EXPERTS}; [embedded] {EMBEDDED_EXPERTS})")
    a("--expert-epochs", type=int, default=None,
      help=f"epochs per expert (default {PTLM_EXPERT_EPOCHS}; [embedded] {EMBEDDED_EXPERT_EPOCHS})")
    a("--arch", default="convnet", help="distillation / expert network")
    a("--factor", type=int, default=None,
      help="factorisation factor f (each stored image holds f x f images); default 1 for plain "
           "DM, 2 with plugins (PTLM)")
    a("--lr-img", type=float, default=None,
      help="image learning rate in normalised space; default DM: 1.0 (10 for IPC >= 100); with "
           "plugins: PTLM's 0.01 x IPC in pixel space, i.e. 0.01 x IPC / mean(std)^2 here")
    a("--momentum", type=float, default=0.5, help="image optimiser momentum (DM and DANCE: 0.5)")
    a("--batch-real", type=int, default=None,
      help=f"real images per class per iteration (default {DM_BATCH_REAL}; "
           f"[embedded] {EMBEDDED_BATCH_REAL})")
    a("--init", choices=["real", "noise"], default="real", help="synthetic initialisation")
    a("--no-dsa", action="store_true", help="turn off DSA augmentation during distillation")
    a("--seed", type=int, default=0, help="run seed: same seed, same synthetic set on CPU")
    a("--device", default="auto", help="cpu, cuda or auto")
    a("--out", default=None, help="run directory (default runs/dm-<dataset>-ipc<ipc>-<plugins>-s<seed>)")
    a("--resume", default=None, metavar="RUN_DIR",
      help="continue the run in RUN_DIR from its last checkpoint (its config.json wins)")
    a("--eval-runs", type=int, default=None,
      help=f"evaluation runs (default {DM_EVAL_RUNS}; [embedded] {EMBEDDED_EVAL_RUNS}); 0 skips")
    a("--eval-epochs", type=int, default=None,
      help=f"epochs per evaluation run (default {DM_EVAL_EPOCHS}; [embedded] {EMBEDDED_EVAL_EPOCHS})")
    a("--eval-arch", default="convnet", help="comma list: convnet, resnet10, resnet18, densenet121")
    a("--eval-protocol", choices=["dm", "dance"], default="dm",
      help="dm: DSA; dance: DSA + CutMix (p 0.5)")
    a("--channels-last", choices=["auto", "on", "off"], default="auto",
      help="channels-last memory format for the networks; auto = on for CPU (measured faster, "
           "see README benchmarks), off for CUDA")
    a("--compile", action="store_true",
      help="torch.compile the real-image forward (one-off compile time, faster iterations)")
    a("--checkpoint-every", type=int, default=100, help="iterations between checkpoints")
    a("--log-every", type=int, default=10, help="iterations between metrics.jsonl records")
    a("--no-progress", action="store_true", help="no progress bars")
    return p


def resolve_config(args: argparse.Namespace, dataset) -> dict:
    """Every setting with its default resolved (what config.json records)."""
    from dm_plugins import parse_plugin_names
    plugins = parse_plugin_names(args.plugins)
    embedded = args.dataset == EMBEDDED
    pick = lambda value, full, small: value if value is not None else (small if embedded else full)
    factor = args.factor if args.factor is not None else (2 if plugins else 1)
    if args.lr_img is not None:
        lr_img = args.lr_img
    elif plugins:
        mean_var = sum(s * s for s in dataset.std) / len(dataset.std)
        lr_img = 0.01 * args.ipc / mean_var
    else:
        lr_img = 10.0 if args.ipc >= 100 else 1.0
    return {
        "method": "dm", "dataset": dataset.name, "data_path": args.data_path, "ipc": args.ipc,
        "iterations": pick(args.iterations, DM_ITERATIONS, EMBEDDED_ITERATIONS),
        "plugins": plugins, "alpha": args.alpha, "lam": args.lam, "tau": args.tau,
        "experts": args.experts,
        "num_experts": pick(args.num_experts, PTLM_EXPERTS, EMBEDDED_EXPERTS),
        "expert_epochs": pick(args.expert_epochs, PTLM_EXPERT_EPOCHS, EMBEDDED_EXPERT_EPOCHS),
        "arch": args.arch, "factor": factor, "lr_img": lr_img, "momentum": args.momentum,
        "batch_real": pick(args.batch_real, DM_BATCH_REAL, EMBEDDED_BATCH_REAL),
        "init": args.init, "dsa": not args.no_dsa, "seed": args.seed, "device": args.device,
        "eval_runs": pick(args.eval_runs, DM_EVAL_RUNS, EMBEDDED_EVAL_RUNS),
        "eval_epochs": pick(args.eval_epochs, DM_EVAL_EPOCHS, EMBEDDED_EVAL_EPOCHS),
        "eval_arch": [s.strip() for s in args.eval_arch.split(",") if s.strip()],
        "eval_protocol": args.eval_protocol, "channels_last": args.channels_last,
        "compile": args.compile, "checkpoint_every": args.checkpoint_every,
        "log_every": args.log_every,
    }


def default_out(config: dict) -> str:
    name = config["dataset"].split(":", 1)[-1].rstrip("/").split("/")[-1]
    plugins = "+".join(config["plugins"]) or "none"
    return os.path.join("runs", f"dm-{name}-ipc{config['ipc']}-{plugins}-s{config['seed']}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from baselines.harness.errors import USER_ERRORS
    try:
        return run(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is kept; continue with --resume RUN_DIR",
              file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    from adapters.dm import build_dm_host
    from baselines.harness.common import (check_ipc, evaluate_stored, initial_synthetic,
                                          resolve_device, save_synthetic)
    from baselines.harness.datasets import canonical_dataset_name, load_dataset
    from baselines.harness.expert_cache import load_or_train_experts
    from baselines.harness.networks import get_network
    from baselines.harness.runs import RunDir, environment, peak_memory_mb
    from dm_plugins import PluginSet, check_plugin_names

    progress = not args.no_progress
    if args.resume:
        run_dir = RunDir.open(args.resume)
        config = run_dir.read_config()
        args.dataset, args.data_path = config["dataset"], config["data_path"]
    else:
        check_plugin_names(args.plugins)  # before any slow work (data, experts)
    args.dataset = canonical_dataset_name(args.dataset)
    dataset = load_dataset(args.dataset, args.data_path)
    if not args.resume:
        config = resolve_config(args, dataset)
        check_ipc(dataset, config["ipc"], config["factor"], config["init"])
        config["environment"] = environment()
        run_dir = RunDir.create(args.out or _unused(default_out(config)), config)
    device = resolve_device(args.device if args.resume else config["device"])
    channels_last = use_channels_last(config["channels_last"], device)
    log = _logger(run_dir)
    log(f"run directory {run_dir.path}; dataset {dataset.name} "
        f"({dataset.num_classes} classes, {len(dataset.train)} train images); plugins "
        f"{','.join(config['plugins']) or 'none'}; device {device}")

    def factory():
        return get_network(config["arch"], dataset.channels, dataset.num_classes,
                           dataset.image_size)

    experts = None
    if {"ptm", "plm"} & set(config["plugins"]):
        experts, where = load_or_train_experts(
            dataset, config["arch"], num_experts=config["num_experts"],
            epochs=config["expert_epochs"], seed=config["seed"], directory=config["experts"],
            device=device, progress=progress, channels_last=channels_last, log=log)
    plugins = PluginSet.from_names(config["plugins"], experts=experts, alpha=config["alpha"],
                                   lam=config["lam"], tau=config["tau"])
    syn_init = initial_synthetic(dataset, config["ipc"], config["factor"], config["init"],
                                 config["seed"])
    host = build_dm_host(dataset, factory, syn_init, plugins=plugins,
                         iterations=config["iterations"], batch_real=config["batch_real"],
                         lr=config["lr_img"], momentum=config["momentum"],
                         factor=config["factor"], seed=config["seed"], device=device,
                         dsa=config["dsa"], compile_real=config["compile"],
                         channels_last=channels_last)
    checkpoint = run_dir.load_checkpoint()
    if checkpoint is not None:
        host.load_state_dict(checkpoint["host"])
        run_dir.truncate_metrics(host.iteration)
        log(f"resumed at iteration {host.iteration} of {config['iterations']}")

    def after_iteration(t: int, metrics: dict) -> None:
        done = t + 1
        if t % config["log_every"] == 0 or done == config["iterations"]:
            metrics["peak_memory_mb"] = round(peak_memory_mb(device), 1)
            run_dir.append_metrics(metrics)
        if done % config["checkpoint_every"] == 0 or done == config["iterations"]:
            run_dir.save_checkpoint({"host": host.state_dict(), "iteration": done})

    started = time.perf_counter()
    stored = host.run(callback=after_iteration, progress=progress)
    log(f"distillation done: {config['iterations']} iterations in "
        f"{time.perf_counter() - started:.1f} s, peak memory {peak_memory_mb(device):.0f} MiB")
    save_synthetic(run_dir, dataset, stored, ipc=config["ipc"], factor=config["factor"],
                   method="dm", plugins=config["plugins"], config=config, seed=config["seed"])
    log(f"wrote {run_dir.synset_path} and {run_dir.grid_path}")
    if config["eval_runs"] > 0:
        results = evaluate_stored(
            dataset, stored, ipc=config["ipc"], factor=config["factor"],
            archs=config["eval_arch"], runs=config["eval_runs"], epochs=config["eval_epochs"],
            protocol=config["eval_protocol"], seed=config["seed"], device=device,
            progress=progress, channels_last=channels_last, log=log)
        summary = dict(results[0])
        summary["per_arch"] = results
        summary.update({"method": "dm", "plugins": config["plugins"], "ipc": config["ipc"],
                        "dataset": dataset.name, "iterations": config["iterations"]})
        run_dir.write_results(summary)
        log(f"wrote {run_dir.results_path}")
    return 0


def _unused(path: str) -> str:
    """``path``, or ``path-2``, ``path-3``, ... if it is taken (default run names only)."""
    candidate, n = path, 1
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}-{n}"
    return candidate


def use_channels_last(choice: str, device: torch.device) -> bool:
    return choice == "on" or (choice == "auto" and device.type == "cpu")


def _logger(run_dir):
    def log(message: str) -> None:
        print(message, flush=True)
        run_dir.log(message)
    return log


if __name__ == "__main__":
    sys.exit(main())
