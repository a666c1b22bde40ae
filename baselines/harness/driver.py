"""The run driver every distillation command line calls (``baselines/dm.py`` and its siblings):
``main(spec, argv)`` with the method's :class:`~baselines.harness.spec.MethodSpec`.

It parses the command line (:mod:`baselines.harness.command_line`, from the settings table in
:mod:`baselines.harness.settings`), starts the processes asked for (``--nproc-per-node``),
runs the phases of :mod:`baselines.harness.phases` and turns what stops a run into its exit
code and one line: 0; 2 for a user error or a non-finite loss (``error: ...``); 3 for a full
disk; 130 / 143 when interrupted by SIGINT / SIGTERM (the last checkpoint is kept). See
docs/cli.md for the flags and docs/reliability.md for the failure behaviour.

The names a method's command-line file needs are importable from here: :class:`MethodSpec`,
:class:`HostRequest`, :class:`Preset`, :class:`Rule`, :data:`EMBEDDED`.
"""
from __future__ import annotations

import argparse
import os
import sys

from .cpu_threads import apply_threads
from .command_line import DefaultsOnceFormatter, build_parser, describe_default, parse_args
from .launch import NPROC_ENV
from .opening import (check_before_launch, check_places, new_run_config, space_needed,
                      use_channels_last)
from .phases import run, write_curves
from .resolve import (OPTIONAL_ON_RESUME, config_differences, default_out, required_keys,
                      resolve_config, resolve_settings, unused_path)
from .spec import (EMBEDDED, EMBEDDED_BUDGET, LAYERED, BuildHost, Host, HostRequest,
                   MethodSpec, Preset, Rule)

__all__ = ["main", "MethodSpec", "HostRequest", "Host", "BuildHost", "Preset", "Rule",
           "EMBEDDED", "EMBEDDED_BUDGET", "LAYERED", "DISK_FULL", "build_parser",
           "describe_default", "parse_args", "resolve_settings", "resolve_config",
           "default_out", "unused_path", "use_channels_last", "new_run_config", "check_places",
           "space_needed", "required_keys", "config_differences", "OPTIONAL_ON_RESUME",
           "DefaultsOnceFormatter", "run", "write_curves", "print_config", "launcher",
           "restart"]


def main(spec: MethodSpec, argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run; the exit code (0; 2 for a user error or a non-finite loss; 130 /
    143 when interrupted by SIGINT / SIGTERM).

    Launched by ``torchrun`` with ``WORLD_SIZE > 1``, a method whose spec ``shards_classes``
    runs class-sharded (each rank its own classes; rank 0 writes the run directory, see
    :func:`baselines.harness.phases.run`); any other method is refused with one line before
    any work."""
    from .errors import USER_ERRORS
    try:
        args, explicit = parse_args(spec, argv)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        return print_config(spec, args, explicit)
    apply_threads(args.threads)  # before any work; children of --nproc-per-node get it again
    nproc = getattr(args, "nproc_per_node", None)
    if nproc is not None and "WORLD_SIZE" not in os.environ:
        if nproc < 1:
            print(f"error: --nproc-per-node must be >= 1, got {nproc}", file=sys.stderr)
            return 2
        if nproc > 1:
            import inspect

            from .launch import launch, strip_flag
            try:  # what every worker would refuse alike: one line, not one per worker
                check_before_launch(spec, args, explicit, nproc)
            except USER_ERRORS as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            script = inspect.getfile(spec.build_host)  # the method's command-line file
            return launch(script, strip_flag(list(sys.argv[1:] if argv is None else argv)),
                          nproc)
    from dm_plugins import distributed

    from .guards import NonFiniteLoss, StopRequest
    stop = StopRequest()
    world = distributed.World()
    try:
        world = _world(spec)
        with stop.installed():
            code = run(spec, args, explicit, stop, world)
            # the ranks leave together: a rank tearing its process group down while rank 0
            # still writes the results was seen to abort (SIGABRT in gloo) now and then
            distributed.barrier()
            return code
    except USER_ERRORS + (NonFiniteLoss,) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except distributed.PeerFailed:  # the failing rank printed its error
        return 2
    except OSError as exc:
        from .paths import is_disk_full
        if not is_disk_full(exc):
            raise
        message = disk_full_message(exc, stop, *restart(world, spec.program))
        print(f"error: {message}", file=sys.stderr)
        return DISK_FULL
    except KeyboardInterrupt:
        if world.is_main:
            message = stop.message(*restart(world, spec.program))
            print(message, file=sys.stderr)
            if stop.run_dir is not None:
                stop.run_dir.log(message)
        return stop.exit_code
    finally:
        if stop.run_dir is not None:
            stop.run_dir.release()
        distributed.destroy_process_group()


DISK_FULL = 3
"""Exit code of a run stopped by a full disk (docs/reliability.md lists every exit code)."""


def disk_full_message(exc: OSError, stop, prog: str, launcher_: str) -> str:
    """One line: the file that could not be written, the space left, what was kept and the
    command that continues (nothing older is damaged: every write is atomic)."""
    from .paths import free_bytes, mib
    name = exc.filename or "a file"
    where = os.path.dirname(os.path.abspath(name)) if exc.filename else "."
    written = getattr(exc, "written", None)
    part = f" after {mib(written)} of it" if written else ""
    free = f"{mib(free_bytes(where))} free there"
    if stop.run_dir is None:
        return f"no space left on device writing {name}{part} ({free}); free some space"
    if stop.checkpoint is not None:
        kept = (f"the checkpoint after {stop.checkpoint} iterations "
                f"({stop.run_dir.checkpoint_path}) is kept")
    elif stop.run_dir.checkpoint_path.is_file():
        kept = f"its checkpoint {stop.run_dir.checkpoint_path} is kept"
    else:
        kept = "no checkpoint was written yet"
    return (f"no space left on device writing {name}{part} ({free}); {kept}; free some space "
            f"and continue with: {launcher_} {prog} --resume {stop.run_dir.path}")


def print_config(spec: MethodSpec, args: argparse.Namespace, explicit) -> int:
    """``--print-config``: the settings a new run would use, each with its source, as JSON on
    stdout; nothing is written and no work starts (the dataset is read, since some defaults
    depend on it). 0, or 2 with one line for a setting that would be refused."""
    import json

    from .errors import USER_ERRORS
    if args.resume:
        print("error: --print-config shows a new run's settings; a run's own are in its "
              "config.json", file=sys.stderr)
        return 2
    try:
        from .opening import new_run_config
        _, config = new_run_config(spec, args, explicit)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config.pop("environment", None)
    print(json.dumps(config, indent=2, sort_keys=False))
    return 0


def _world(spec: MethodSpec):
    """This process's :class:`dm_plugins.distributed.World`; a UsageError when torchrun
    launched more than one process for a method that does not shard classes."""
    from dm_plugins.distributed import world_from_env

    from .common import UsageError
    try:
        world = world_from_env()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if world.distributed and not spec.shards_classes:
        raise UsageError(f"{spec.program} does not run in several "
                         f"processes (WORLD_SIZE={world.world_size}; its MethodSpec does not shard "
                         f"classes); launch it as one process")
    return world


def restart(world, prog: str) -> tuple[str, str]:
    """``(program with its flags, launcher)`` that start ``prog`` again with this run's number
    of processes, for the messages that end in ``<launcher> <program> --resume RUN``: ``prog``
    and ``python``; ``prog --nproc-per-node N`` and ``python`` for the workers that flag
    started; ``prog`` and torchrun's command (:func:`launcher`) under torchrun."""
    if world.distributed and os.environ.get(NPROC_ENV) == str(world.world_size):
        return f"{prog} --nproc-per-node {world.world_size}", "python"
    return prog, launcher(world)


def launcher(world) -> str:
    """What starts a program again with this run's number of processes (for messages):
    ``python``, or torchrun's command for a run of several processes."""
    if not world.distributed:
        return "python"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world.world_size))
    nodes = world.world_size // max(per_node, 1)
    return (f"torchrun --nproc-per-node {per_node}" if nodes <= 1 else
            f"torchrun --nnodes {nodes} --nproc-per-node {per_node} (rendezvous flags as before)")
