"""The first phase of a run: check a new run's settings and places, or a resumed run's
record, and open its run directory (:func:`open_run`, giving an :class:`OpenRun`).

Nothing here starts work that takes long: every user error a run can raise before it distils is
raised here (or in :mod:`baselines.harness.building`), before the run directory is written.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from dm_plugins import distributed
from dm_plugins.distributed import World

from .cpu_threads import describe
from .resolve import (check_resume_flags, default_out, required_keys, resolve_config,
                      unused_path)
from .runs import RunDir, RunError
from .spec import MethodSpec

if TYPE_CHECKING:  # pragma: no cover
    from .datasets import Dataset
    from .guards import StopRequest


@dataclass
class OpenRun:
    """A run whose directory is open: what every later phase reads.

    ``created``: this process made the directory now (a setup failure removes it again);
    ``log``: prints and appends to ``run.log`` (held until :meth:`RunLog.release` on a
    resume, so a refused resume leaves the log as it was); ``progress``: progress bars."""

    spec: MethodSpec
    config: dict
    dataset: "Dataset"
    run_dir: "RunDir"
    device: torch.device
    channels_last: bool
    world: "World"
    stop: "StopRequest"
    log: Callable[[str], None]
    created: bool
    progress: bool

    @property
    def sharded(self) -> bool:
        return self.world.distributed

    @property
    def main_rank(self) -> bool:
        return self.world.is_main


def use_channels_last(choice: str, device: torch.device) -> bool:
    return choice == "on" or (choice == "auto" and device.type == "cpu")


def new_run_config(spec: MethodSpec, args: argparse.Namespace,
                   explicit: frozenset[str] | set[str] = frozenset()) -> tuple["Dataset", dict]:
    """The dataset and the checked config of a new run (``args.resume`` unset): plugin names,
    then the data, every setting's rule, the IPC and the device; nothing is written. Raises the
    user errors a run would raise before it starts."""
    from dm_plugins import check_plugin_names

    from .common import UsageError, check_ipc, resolve_device
    from .datasets import canonical_dataset_name, load_dataset
    from .plugin_flags import check_host_offers, check_plugin_flags
    from .runs import environment
    from .validation import check_config

    if args.plugins is not None:
        if not args.plugins.strip():
            raise UsageError("--plugins is empty; name plugins (e.g. cap,plm) or 'none'")
        check_plugin_names(args.plugins)  # before any slow work (data, experts)
    dataset = load_dataset(canonical_dataset_name(args.dataset), args.data_path)
    config = resolve_config(spec, args, dataset, explicit)
    check_config(config, spec.checks, image_size=dataset.image_size, out=args.out)
    check_capabilities(spec, config)
    check_plugin_flags(config)
    check_host_offers(config, spec.offers, spec.program)
    check_ipc(dataset, config["ipc"], config["factor"], config["init"])
    check_places(spec, config, dataset, args.out)
    config["device"] = str(resolve_device(config["device"]))  # resume keeps this device
    config["environment"] = environment()
    return dataset, config


def check_capabilities(spec: MethodSpec, config: dict) -> None:
    """A UsageError for a setting the method declares it cannot do (``supports_compile``)."""
    from .common import UsageError
    if config.get("compile") and not spec.supports_compile:
        raise UsageError(f"--compile is not supported by {spec.name} (its matching "
                         f"networks change every iteration); drop --compile")


def check_places(spec: MethodSpec, config: dict, dataset: "Dataset", out: str | None) -> None:
    """The places a new run writes, checked before any work: ``--out`` (new, empty or a run;
    a folder the run can be created in), the expert directory when experts are still to be
    trained there, and enough free space for what the run will write."""
    from dm_plugins import plugins_need_experts

    from .expert_cache import cached_expert_count, experts_directory
    from .paths import check_free_space, check_new_run_dir, check_writable_dir
    target = out or os.path.dirname(default_out(config))
    (check_new_run_dir if out else check_writable_dir)("--out", target)
    missing = 0
    if spec.needs_experts or plugins_need_experts(config["plugins"]):
        directory = experts_directory(config)
        missing = max(0, config["num_experts"] - cached_expert_count(directory))
        if missing:
            check_writable_dir("--experts", directory)
    need_run, need_experts = space_needed(config, dataset, missing)
    check_free_space("--out", target, need_run)
    if missing:
        check_free_space("--experts", experts_directory(config), need_experts)


def space_needed(config: dict, dataset: "Dataset", missing_experts: int) -> tuple[int, int]:
    """Bytes a run will write (estimated generously): ``(run directory, expert directory)``.
    The run directory holds two checkpoints at a time during a write (stored images plus up to
    two optimiser buffers each), the synthetic set and 2 MiB of logs and figures; each missing
    expert is two state dicts (initial and trained weights)."""
    from .networks import get_network
    pixels = (dataset.num_classes * config["ipc"] * dataset.channels * dataset.image_size ** 2)
    stored = 4 * pixels
    run_dir = 2 * 3 * stored + stored + (2 << 20)
    experts = 0
    if missing_experts:
        net = get_network(config["arch"], dataset.channels, dataset.num_classes,
                          dataset.image_size)
        experts = missing_experts * 2 * 4 * sum(p.numel() for p in net.parameters()) + (1 << 20)
    return run_dir, experts


def check_processes(world, dataset, arch: str) -> None:
    """A UsageError, for a run of several processes, when there are more processes than
    classes, or when ``arch`` couples the images of a batch (BatchNorm in training mode: each
    process's batch statistics would differ from one process's)."""
    from dm_plugins.chunking import batch_independent

    from .common import UsageError
    from .networks import get_network
    if not world.distributed:
        return
    if world.world_size > dataset.num_classes:
        raise UsageError(f"{world.world_size} processes for {dataset.num_classes} classes: each "
                         f"process needs at least one class; use at most "
                         f"{dataset.num_classes} processes")
    if not batch_independent(get_network(arch, dataset.channels, dataset.num_classes,
                                         dataset.image_size).train()):
        raise UsageError(f"--arch {arch} has BatchNorm, whose batch statistics would mix the "
                         f"classes each process holds, so several processes would not compute "
                         f"what one does; use a ConvNet (instance norm) or one process")


def checked_record(spec: MethodSpec, args, explicit, run_dir: RunDir, world_size: int) -> dict:
    """The config ``--resume`` continues ``run_dir`` with: its record, checked against the
    method, the flags given, the keys a run must record and the number of processes
    (``world_size``); a RunError or UsageError naming what does not fit."""
    config = run_dir.read_config()
    if config.get("method", spec.name) != spec.name:
        raise RunError(f"{run_dir.path} holds a {config['method']!r} run, not a "
                       f"{spec.name!r} one; resume it with baselines/{config['method']}.py")
    check_resume_flags(args, explicit, config, run_dir.path)
    missing = sorted(required_keys(spec) - set(config))
    if missing:
        raise RunError(f"{run_dir.config_path} lacks {', '.join(missing)}; it was not "
                       f"written by this program or was edited; start a new run")
    recorded = int(config.get("world_size", 1))
    if recorded != world_size:
        again = (f"python {spec.program} --resume {run_dir.path}" if recorded == 1 else
                 f"python {spec.program} --nproc-per-node {recorded} --resume {run_dir.path}, "
                 f"or torchrun with {recorded} processes in all")
        raise RunError(f"{run_dir.path} was distilled by {recorded} process(es), this is "
                       f"{world_size}; resume it with {recorded} (e.g. {again})")
    return config


def check_before_launch(spec: MethodSpec, args, explicit, nproc: int) -> None:
    """The refusals each of ``nproc`` processes would make alike, made once by
    ``--nproc-per-node`` before it starts them, so that one line is printed and not one per
    process: a new run's settings and places (:func:`new_run_config`), or a resumed run's
    record (:func:`checked_record`), then the number of processes and the architecture
    (:func:`check_processes`). Nothing is written; the workers check again."""
    from .datasets import canonical_dataset_name, load_dataset
    from .plugin_flags import check_plugin_flags
    from .validation import check_config

    if args.resume:
        config = checked_record(spec, args, explicit, RunDir.open(args.resume, clean=False),
                                nproc)
        dataset = load_dataset(canonical_dataset_name(config["dataset"]), config["data_path"])
        check_config(config, spec.checks, image_size=dataset.image_size)
        check_plugin_flags(config)
    else:
        dataset, config = new_run_config(spec, args, explicit)
    check_processes(World(0, nproc), dataset, config["arch"])


def _resumed(spec: MethodSpec, args, explicit, world, stop) -> tuple[Any, dict, Any, Any]:
    """``(run_dir, config, dataset, device)`` of ``--resume``: the record checked against the
    flags given, the command line and the number of processes; the lock taken."""
    from .common import resolve_device
    from .datasets import canonical_dataset_name, load_dataset
    from .errors import USER_ERRORS
    from .plugin_flags import check_plugin_flags
    from .validation import check_config

    run_dir = RunDir.open(args.resume, world.rank, world.world_size, clean=world.is_main)
    config = checked_record(spec, args, explicit, run_dir, world.world_size)
    device = distributed.init_process_group(world, resolve_device(config["device"]))
    distributed.main_first(world, run_dir.acquire if world.is_main else lambda: None,
                           USER_ERRORS)
    stop.run_dir = run_dir  # main() releases the lock
    dataset = distributed.main_first(world, lambda: load_dataset(
        canonical_dataset_name(config["dataset"]), config["data_path"]), USER_ERRORS)
    check_config(config, spec.checks, image_size=dataset.image_size)
    check_plugin_flags(config)
    distributed.main_first(world, lambda: check_processes(world, dataset, config["arch"]),
                           USER_ERRORS)  # alike on every rank: rank 0 says why
    return run_dir, config, dataset, device


def _created(spec: MethodSpec, args, explicit, world) -> tuple[Any, dict, Any, Any]:
    """``(run_dir, config, dataset, device)`` of a new run: checked, then its directory made by
    rank 0 (which holds the lock); the other ranks get its path."""
    from .common import resolve_device
    from .errors import USER_ERRORS

    device = None
    if world.distributed:
        device = distributed.init_process_group(world, resolve_device(args.device))
    dataset, config = distributed.main_first(
        world, lambda: new_run_config(spec, args, explicit), USER_ERRORS)
    distributed.main_first(world, lambda: check_processes(world, dataset, config["arch"]),
                           USER_ERRORS)  # alike on every rank: rank 0 says why
    config["world_size"] = world.world_size

    def create() -> RunDir:
        return RunDir.create(args.out or unused_path(default_out(config)), config,
                             world.rank, world.world_size)
    made = distributed.main_first(world, create if world.is_main else lambda: None,
                                  USER_ERRORS)
    path = distributed.broadcast_object(str(made.path) if world.is_main else None)
    run_dir = made if world.is_main else RunDir(path, world.rank, world.world_size)
    return run_dir, config, dataset, device


def open_run(spec: MethodSpec, args: argparse.Namespace, explicit, stop: "StopRequest",
             world: "World") -> OpenRun:
    """Open ``args.resume`` or create a new run directory; log the run's first line."""
    from dm_plugins.heartbeat import bars_wanted

    from .common import resolve_device
    from .runs import RunLog, silent

    if args.resume:
        run_dir, config, dataset, device = _resumed(spec, args, explicit, world, stop)
    else:
        run_dir, config, dataset, device = _created(spec, args, explicit, world)
    created = world.is_main and not args.resume
    stop.run_dir = run_dir
    if not world.distributed:
        device = resolve_device(config["device"])
    log = RunLog(run_dir, hold=not created) if world.is_main else silent
    opened = OpenRun(spec=spec, config=config, dataset=dataset, run_dir=run_dir,
                     device=device, channels_last=use_channels_last(config["channels_last"],
                                                                    device),
                     world=world, stop=stop, log=log, created=created,
                     progress=bars_wanted(args.no_progress) and world.is_main)
    log(f"run directory {run_dir.path}; dataset {dataset.name} "
        f"({dataset.num_classes} classes, {len(dataset.train)} train images); method "
        f"{config['method']}, preset {config.get('preset', config['method'])}; plugins "
        f"{','.join(config['plugins']) or 'none'}; device {device}"
        + (f"; {describe(torch.get_num_threads(), given=bool(args.threads))}"
           if device.type == "cpu" else "")
        + (f"; {world.world_size} processes, classes sharded" if world.distributed else ""))
    return opened
