"""The run driver every distillation command line calls (``baselines/dm.py`` and its siblings).

A command line is a :class:`MethodSpec`: the method's name and description, its default
hyperparameters, optional presets, optional extra arguments, and a ``build_host`` function that
turns the resolved settings into a host (the object that runs the distillation loop, e.g.
:class:`dm_plugins.DMHost`). ``main(spec, argv)`` does everything else:

* the command line shared by every method (dataset, IPC, plugins, experts, evaluation, ...);
* default resolution with provenance: command line > preset > embedded-dataset budget >
  method default; ``config.json`` records every value and where it came from (``sources``);
* the run directory (``baselines/harness/runs.py``): create, or ``--resume`` (config.json wins);
* experts, trained or loaded through the cache, when a chosen plugin declares it needs them;
* the :class:`dm_plugins.PluginSet`, checkpoints, ``metrics.jsonl``, ``run.log``;
* ``synthetic.pt`` / ``grid.png``, the evaluation and ``results.json``;
* errors: one line ``error: ...`` and exit code 2 for user errors, exit code 130 on Ctrl-C
  (the last checkpoint is kept);
* several processes (``torchrun --nproc-per-node K``, methods whose spec ``shards_classes``):
  classes sharded over the ranks, rank 0 writing the run directory (see :func:`run`).

The host contract the driver relies on (see :class:`Host`): ``host.run(callback=fn,
progress=bool)`` runs from ``host.iteration`` to the end calling ``fn(t, metrics)`` after each
iteration and returns the stored synthetic images; ``host.state_dict()`` /
``host.load_state_dict(state)`` for checkpoints.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

import torch

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from dm_plugins import PluginSet

    from .datasets import Dataset

EMBEDDED = "digits"
"""The dataset shipped with the code (offline); it gets :data:`EMBEDDED_BUDGET`."""

EMBEDDED_BUDGET: Mapping[str, Any] = {
    "iterations": 100, "batch_real": 64, "eval_runs": 1, "eval_epochs": 300,
    "num_experts": 2, "expert_epochs": 15,
}
"""A smaller budget on the embedded set, so a run takes minutes on a CPU ([embedded] in --help)."""

LAYERED = ("iterations", "plugins", "factor", "lr_img", "momentum", "batch_real",
           "num_experts", "expert_epochs", "eval_runs", "eval_epochs")
"""Shared hyperparameters whose default belongs to the method (or a preset): every
:attr:`MethodSpec.defaults` defines them all; on the command line their default is "resolve"."""

COMMAND_LINE = "command line"
EMBEDDED_SOURCE = "embedded dataset"

# argparse destinations that are not settings (or are recorded under another name)
_NOT_SETTINGS = ("out", "resume", "no_progress", "preset", "config", "print_config",
                 "config_values", "nproc_per_node")
_CONFIG_KEY = {"no_dsa": "dsa"}


class Host(Protocol):
    """What the driver needs from a method's host (:class:`dm_plugins.DMHost` satisfies it)."""

    iteration: int

    def run(self, callback: Callable[[int, dict], None] | None = None,
            progress: bool = True) -> torch.Tensor: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


BuildHost = Callable[..., Host]
"""``build_host(dataset, network_factory, syn_init, plugins, config, device, channels_last)``
(plus ``experts=`` when the method's spec says ``needs_experts``, and ``shard=`` in a run of
several processes when it says ``shards_classes``): ``syn_init`` are the stored
synthetic images (normalised, sorted by class, factorised when ``config["factor"] > 1``);
``config`` is the resolved config (config.json). The host's ``run`` returns the stored images
normalised, or in pixel space when the host has ``stores_pixels = True``."""


@dataclass(frozen=True)
class Rule:
    """A default computed from the dataset and the other settings: ``fn(dataset, settings)``,
    where ``settings`` holds every value that is not itself a Rule, by argparse dest (``ipc``,
    ``factor``, ``no_dsa``, ...). ``text`` is how ``--help`` states it."""

    fn: Callable[["Dataset", dict], Any]
    text: str


@dataclass(frozen=True)
class Preset:
    """Named defaults that take precedence over the method's and the embedded budget's (the
    command line still wins). ``values`` maps setting names to constants or :class:`Rule`."""

    description: str
    values: Mapping[str, Any]


@dataclass(frozen=True)
class MethodSpec:
    """One distillation method's command line.

    Attributes:
        name: ``config["method"]``, the run-directory prefix, the synthetic set's ``method``,
            and the name of the preset that means "the method's own defaults".
        description: the ``--help`` description.
        defaults: the method's defaults (constants or :class:`Rule`); must define every name
            in :data:`LAYERED`, may define any other setting (its parser default then loses).
        build_host: see :data:`BuildHost`.
        add_arguments: ``fn(parser)`` adding the method's own arguments; their values land in
            config.json under their argparse ``dest`` (and in ``sources``).
        presets: extra presets by name (``--preset NAME``); the method's own name is always a
            preset too (no overrides), and the default.
        embedded_budget: defaults on the embedded dataset (below presets, above the method's).
        prog: the program name in ``--help`` (default ``baselines/<name>.py``).
        needs_experts: the method itself uses the expert pool (DANCE): experts are loaded or
            trained for every run, and ``build_host`` gets them as the keyword ``experts``.
        checks: the method's own settings' rules, config key -> a rule name of
            :data:`baselines.harness.validation.RULES` (``"positive"``, ``"nonnegative"``,
            ...), checked with the shared ones before anything is written.
        shards_classes: the host can run class-sharded (``torchrun --nproc-per-node K``):
            ``build_host`` then gets the keyword ``shard`` (a
            :class:`dm_plugins.distributed.ClassShard`), ``syn_init`` holds only the shard's
            classes and ``dataset.train`` only their images (see :func:`run`). False: a launch
            of more than one process is refused before any work.
        needs_every_class: with ``shards_classes``, ``dataset.train`` keeps every class's
            images in every process (IDM: its model queue trains on all of them).
        offers: what the method's host gives plugins (:attr:`dm_plugins.DistillContext.offers`);
            plugin options that need more are refused before any work.
    """

    name: str
    description: str
    defaults: Mapping[str, Any]
    build_host: BuildHost
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    presets: Mapping[str, Preset] = field(default_factory=dict)
    embedded_budget: Mapping[str, Any] = field(default_factory=lambda: dict(EMBEDDED_BUDGET))
    prog: str | None = None
    needs_experts: bool = False
    checks: Mapping[str, str] = field(default_factory=dict)
    shards_classes: bool = False
    needs_every_class: bool = False
    offers: frozenset = frozenset()

    def __post_init__(self):
        missing = [key for key in LAYERED if key not in self.defaults]
        if missing:
            raise ValueError(f"MethodSpec {self.name!r}: defaults miss {', '.join(missing)}")
        if self.name in self.presets:
            raise ValueError(f"MethodSpec {self.name!r}: a preset may not take the method's name")

    @property
    def preset_names(self) -> list[str]:
        return [self.name, *self.presets]


# -- --help -----------------------------------------------------------------------------------
class DefaultsOnceFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an argument's help only when there is a default to show (not
    None, not a flag's False) and the help text does not state one already (``(default``)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default is None or action.default is argparse.SUPPRESS or action.nargs == 0
                or "(default" in text):
            return text
        return text + " (default: %(default)s)"


def _show(value: Any) -> str:
    if isinstance(value, Rule):
        return value.text
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "none"
    return str(value)


def describe_default(spec: MethodSpec, key: str) -> str:
    """How ``--help`` states ``key``'s default: ``default 20000; [embedded] 100; preset ptlm: 2``
    (the parts that apply)."""
    parts = [f"default {_show(spec.defaults[key])}"] if key in spec.defaults else []
    if key in spec.embedded_budget:
        parts.append(f"[embedded] {_show(spec.embedded_budget[key])}")
    parts += [f"preset {name}: {_show(p.values[key])}" for name, p in spec.presets.items()
              if key in p.values]
    return "; ".join(parts)


def build_parser(spec: MethodSpec) -> argparse.ArgumentParser:
    """The shared command line plus the method's own arguments."""
    from .validation import OneLineParser
    p = OneLineParser(prog=spec.prog or f"baselines/{spec.name}.py",
                      description=spec.description, formatter_class=DefaultsOnceFormatter)
    a = p.add_argument
    d = lambda key: f"({describe_default(spec, key)})"  # noqa: E731
    presets = "; ".join([f"{spec.name}: the method's own defaults"] +
                        [f"{name}: {p.description}" for name, p in spec.presets.items()])
    a("--dataset", default=EMBEDDED,
      help="digits (embedded, offline), mnist, fashion-mnist, cifar10, cifar100, tinyimagenet, "
           "imagenette/imagewoof/imagemeow/imagesquawk/imagefruit/imageyellow, or "
           "imagefolder:PATH (PATH/train/<class>/*, PATH/test/<class>/*)")
    a("--data-path", default="data", help="where torchvision/TinyImageNet/ImageNet files live")
    a("--ipc", type=int, default=10, help="stored synthetic images per class")
    a("--preset", choices=spec.preset_names, default=spec.name,
      help=f"where unset hyperparameters take their defaults from: {presets}. Precedence: "
           f"command line > preset > [embedded] budget > method default; config.json records "
           f"each value's source")
    a("--iterations", type=int, default=None, help=f"distillation iterations T {d('iterations')}")
    a("--plugins", default=None,
      help=f"comma list of cap, ptm, plm (or third-party names), or 'none' {d('plugins')}")
    a("--experts", default=None,
      help="expert directory for methods and plugins that need experts (dance, ptm, plm); "
           "trained and saved there "
           "if empty (default: a cache entry under ./experts keyed by dataset, arch, epochs, "
           "seed; env DM_PLUGINS_EXPERTS moves the cache root)")
    a("--num-experts", type=int, default=None, help=f"experts to train/use {d('num_experts')}")
    a("--expert-epochs", type=int, default=None, help=f"epochs per expert {d('expert_epochs')}")
    from .expert_cache import DEFAULT_RECIPE, RECIPES
    a("--expert-recipe", choices=sorted(RECIPES), default=spec.defaults.get("expert_recipe",
                                                                           DEFAULT_RECIPE),
      help="how experts are trained: " + "; ".join(f"{k}: {v}" for k, v in RECIPES.items()))
    a("--expert-seed", type=int, default=None,
      help="the expert pool's seed, part of its cache key (default: --seed); runs of several "
           "seeds share one pool when given the same --expert-seed")
    a("--arch", default="convnet", help="distillation / expert network")
    a("--factor", type=int, default=None,
      help=f"factorisation factor f: each stored image holds f x f images {d('factor')}")
    a("--lr-img", type=float, default=None,
      help=f"image learning rate (in the space the method stores images in: normalised for "
           f"dm and idm, pixels in [0, 1] for dance) {d('lr_img')}")
    a("--momentum", type=float, default=None, help=f"image optimiser momentum {d('momentum')}")
    a("--batch-real", type=int, default=None,
      help=f"real images per class per iteration {d('batch_real')}")
    a("--init", choices=["real", "noise"], default="real", help="synthetic initialisation")
    a("--no-dsa", action="store_true", help="turn off DSA augmentation during distillation")
    a("--seed", type=int, default=0, help="run seed: same seed, same synthetic set on CPU")
    a("--device", default="auto", help="cpu, cuda or auto")
    a("--out", default=None,
      help=f"run directory (default runs/{spec.name}[-<preset>]-<dataset>-ipc<ipc>-<plugins>-"
           f"s<seed>, the preset named when not {spec.name}; -2, -3, ... appended when taken)")
    a("--resume", default=None, metavar="RUN_DIR",
      help="continue the run in RUN_DIR from its last checkpoint (its config.json wins)")
    a("--config", default=None, metavar="FILE",
      help="settings from a JSON file (config.json's keys; a previous run's config.json works "
           "as is; the files in configs/ hold the paper's rows), below the command line and "
           "above the preset in precedence")
    if spec.shards_classes:
        a("--nproc-per-node", type=int, default=None, metavar="N",
          help="start N processes on this machine (classes sharded, as torchrun "
               "--nproc-per-node N) and exit with their own code; torchrun for several machines")
    a("--print-config", action="store_true",
      help="print the resolved settings with their sources as JSON and exit (nothing is "
           "written)")
    a("--eval-runs", type=int, default=None, help=f"evaluation runs, 0 skips {d('eval_runs')}")
    a("--eval-epochs", type=int, default=None,
      help=f"epochs per evaluation run {d('eval_epochs')}")
    a("--eval-arch", default="convnet", help="comma list: convnet, resnet10, resnet18, densenet121")
    a("--eval-protocol", choices=["dm", "dance", "dsa-cutmix"],
      default=spec.defaults.get("eval_protocol", "dm"),
      help="dm: DM's (batch 256, lr x0.1 at half, per-image DSA); dance: DANCE's (batch 64, "
           "lr x0.2 at 2/3 and 5/6, IDC's per-image colour+crop, CutMix p 0.5); dsa-cutmix: dm "
           "plus CutMix p 0.5 (called dance before 2026-12-04)")
    a("--channels-last", choices=["auto", "on", "off"], default="auto",
      help="channels-last memory format for the networks; auto = on for CPU (measured faster, "
           "see docs/benchmarks.md), off for CUDA")
    a("--compile", action="store_true",
      help="torch.compile the distillation forwards: real images, synthetic images (with "
           "their backward) and plm's expert (a one-off compile time, then faster iterations)")
    a("--eval-compile", action="store_true",
      help="torch.compile each evaluation network (about 20 s once per run on a CPU, then "
           "faster epochs: 1.34 against 1.86 s an epoch on a 400-image set, 1 CPU thread)")
    a("--checkpoint-every", type=int, default=100, help="iterations between checkpoints")
    a("--log-every", type=int, default=10, help="iterations between metrics.jsonl records")
    a("--no-progress", action="store_true", help="no progress bars")
    if spec.add_arguments is not None:
        spec.add_arguments(p)
    from .plugin_flags import add_plugin_flags
    add_plugin_flags(p, lambda key: "; ".join(
        f"preset {name}: {_show(preset.values[key])}" for name, preset in spec.presets.items()
        if key in preset.values))
    return p


def parse_args(spec: MethodSpec, argv: list[str] | None = None
               ) -> tuple[argparse.Namespace, frozenset[str]]:
    """Parse ``argv``; also return the destinations given on the command line (even when
    given their default value), which is what ``sources`` calls "command line"."""
    parser = build_parser(spec)
    args = parser.parse_args(argv)
    probe = build_parser(spec)
    for action in probe._actions:  # argparse lists its actions nowhere public
        action.default = argparse.SUPPRESS  # an option not given is then left out
    explicit = frozenset(vars(probe.parse_args(argv)))
    args.config_values = {}
    if args.config is not None:
        from .common import UsageError
        from .config_file import read_config_file
        if args.resume:
            raise UsageError("--config cannot be combined with --resume (the run's own "
                             "config.json is used)")
        args.config_values, preset = read_config_file(args.config, spec, parser)
        if preset is not None and "preset" not in explicit:
            args.preset = preset
        for dest in ("dataset", "data_path"):  # read before the defaults are resolved
            if dest in args.config_values and dest not in explicit:
                setattr(args, dest, args.config_values[dest])
    return args, explicit


# -- default resolution -----------------------------------------------------------------------
def resolve_settings(spec: MethodSpec, args: argparse.Namespace, dataset: "Dataset",
                     explicit: frozenset[str] | set[str] = frozenset()
                     ) -> tuple[dict[str, Any], dict[str, str]]:
    """Every argparse destination's value and source, by precedence: command line > ``--config``
    file > preset > embedded-dataset budget > method default > parser default (the last two both read
    ``method <name>``). ``explicit`` lists the destinations given on the command line (see
    :func:`parse_args`); a :data:`LAYERED` one that is not None counts as given anyway, since
    its parser default is None."""
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if getattr(args, "config_values", None):
        layers.append((f"config file {args.config}", args.config_values))
    preset = getattr(args, "preset", None) or spec.name
    if preset != spec.name:
        if preset not in spec.presets:
            from .common import UsageError
            raise UsageError(f"unknown preset {preset!r}; choose from "
                             f"{', '.join(spec.preset_names)}")
        layers.append((f"preset {preset}", spec.presets[preset].values))
    if dataset.name == EMBEDDED:
        layers.append((EMBEDDED_SOURCE, spec.embedded_budget))
    method = f"method {spec.name}"
    layers.append((method, spec.defaults))

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    rules: dict[str, Rule] = {}
    for key, given in vars(args).items():
        if key in explicit or (key in LAYERED and given is not None):
            values[key], sources[key] = given, COMMAND_LINE
            continue
        for source, layer in layers:
            if key in layer:
                sources[key] = source
                if isinstance(layer[key], Rule):
                    rules[key] = layer[key]
                else:
                    values[key] = layer[key]
                break
        else:
            values[key], sources[key] = given, method
    settings = dict(values)
    for key, rule in rules.items():
        values[key] = rule.fn(dataset, settings)
    missing = [key for key in LAYERED if values.get(key) is None]
    if missing:
        raise ValueError(f"method {spec.name!r} resolved no default for {', '.join(missing)}")
    return values, sources


def resolve_config(spec: MethodSpec, args: argparse.Namespace, dataset: "Dataset",
                   explicit: frozenset[str] | set[str] = frozenset()) -> dict:
    """Every setting with its default resolved, plus ``preset`` and ``sources`` (what
    config.json records)."""
    from dm_plugins import check_plugin_names

    v, sources = resolve_settings(spec, args, dataset, explicit)
    plugins = v["plugins"]
    plugins = check_plugin_names(list(plugins) if isinstance(plugins, (list, tuple)) else plugins)
    config = {
        "method": spec.name, "preset": getattr(args, "preset", None) or spec.name,
        "dataset": dataset.name, "data_path": v["data_path"], "ipc": v["ipc"],
        "iterations": v["iterations"], "plugins": plugins, "experts": v["experts"],
        "num_experts": v["num_experts"], "expert_epochs": v["expert_epochs"],
        "expert_recipe": v["expert_recipe"],
        "expert_seed": v["seed"] if v.get("expert_seed") is None else v["expert_seed"],
        "arch": v["arch"], "factor": v["factor"], "lr_img": v["lr_img"],
        "momentum": v["momentum"], "batch_real": v["batch_real"], "init": v["init"],
        "dsa": not v["no_dsa"], "seed": v["seed"], "device": v["device"],
        "eval_runs": v["eval_runs"], "eval_epochs": v["eval_epochs"],
        "eval_arch": [s.strip() for s in v["eval_arch"].split(",") if s.strip()],
        "eval_protocol": v["eval_protocol"], "channels_last": v["channels_last"],
        "compile": v["compile"], "eval_compile": v["eval_compile"],
        "checkpoint_every": v["checkpoint_every"],
        "log_every": v["log_every"],
    }
    for key, value in v.items():  # the method's own arguments and the plugins' options
        if key not in _NOT_SETTINGS and _CONFIG_KEY.get(key, key) not in config:
            config[key] = value
    config["sources"] = {_CONFIG_KEY.get(key, key): source for key, source in sources.items()
                         if key not in _NOT_SETTINGS}
    return config


def default_out(config: dict) -> str:
    """``runs/<method>[-<preset>]-<dataset>-ipc<ipc>-<plugins>-s<seed>`` (the preset only when
    it is not the method's own)."""
    name = config["dataset"].split(":", 1)[-1].rstrip("/").split("/")[-1]
    plugins = "+".join(config["plugins"]) or "none"
    method = config["method"]
    preset = config.get("preset", method)
    prefix = method if preset == method else f"{method}-{preset}"
    return os.path.join("runs", f"{prefix}-{name}-ipc{config['ipc']}-{plugins}-s{config['seed']}")


def unused_path(path: str) -> str:
    """``path``, or ``path-2``, ``path-3``, ... if it is taken (default run names only)."""
    candidate, n = path, 1
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}-{n}"
    return candidate


def use_channels_last(choice: str, device: torch.device) -> bool:
    return choice == "on" or (choice == "auto" and device.type == "cpu")


# -- the run ----------------------------------------------------------------------------------
def main(spec: MethodSpec, argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run; the exit code (0; 2 for a user error or a non-finite loss; 130 /
    143 when interrupted by SIGINT / SIGTERM).

    Launched by ``torchrun`` with ``WORLD_SIZE > 1``, a method whose spec ``shards_classes``
    runs class-sharded (each rank its own classes; rank 0 writes the run directory, see
    :func:`run`); any other method is refused with one line before any work."""
    from .errors import USER_ERRORS
    try:
        args, explicit = parse_args(spec, argv)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        return print_config(spec, args, explicit)
    nproc = getattr(args, "nproc_per_node", None)
    if nproc is not None and "WORLD_SIZE" not in os.environ:
        if nproc < 1:
            print(f"error: --nproc-per-node must be >= 1, got {nproc}", file=sys.stderr)
            return 2
        if nproc > 1:
            import inspect

            from .launch import launch, strip_flag
            script = inspect.getfile(spec.build_host)  # the method's command-line file
            return launch(script, strip_flag(list(sys.argv[1:] if argv is None else argv)),
                          nproc)
    from dm_plugins import distributed

    from .errors import USER_ERRORS
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
        message = disk_full_message(exc, stop, spec.prog or f"baselines/{spec.name}.py",
                                    launcher(world))
        print(f"error: {message}", file=sys.stderr)
        return DISK_FULL
    except KeyboardInterrupt:
        if world.is_main:
            message = stop.message(spec.prog or f"baselines/{spec.name}.py", launcher(world))
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
        raise UsageError(f"{spec.prog or f'baselines/{spec.name}.py'} does not run in several "
                         f"processes (WORLD_SIZE={world.world_size}; its MethodSpec does not shard "
                         f"classes); launch it as one process")
    return world


def launcher(world) -> str:
    """What starts a program again with this run's number of processes (for messages):
    ``python``, or torchrun's command for a run of several processes."""
    if not world.distributed:
        return "python"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world.world_size))
    nodes = world.world_size // max(per_node, 1)
    return (f"torchrun --nproc-per-node {per_node}" if nodes <= 1 else
            f"torchrun --nnodes {nodes} --nproc-per-node {per_node} (rendezvous flags as before)")


def _check_resume_flags(spec: MethodSpec, args: argparse.Namespace, explicit, config: dict,
                        path) -> None:
    """Flags given with ``--resume`` must agree with the recorded config (which wins)."""
    from .common import UsageError
    from .plugin_flags import recorded as recorded_value
    from dm_plugins import check_plugin_names

    for dest in sorted(set(explicit) - {"resume", "no_progress", "nproc_per_node"}):
        given = getattr(args, dest)
        flag = "--" + dest.replace("_", "-")
        if dest == "out":
            raise UsageError(f"--out cannot be combined with --resume (the run stays in {path})")
        key = _CONFIG_KEY.get(dest, dest)
        if dest == "no_dsa":
            given = not given
        elif dest == "eval_arch":
            given = [s.strip() for s in given.split(",") if s.strip()]
        elif dest == "plugins":
            given = check_plugin_names(given)
        recorded = recorded_value(config, key, "<not recorded>")
        if dest == "device" and given == "auto":
            continue
        if given != recorded:
            raise UsageError(f"--resume continues {path} with its recorded settings, and {flag} "
                             f"{getattr(args, dest)} differs from the recorded {recorded!r}; drop "
                             f"{flag} (or start a new run)")


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
    check_plugin_flags(config)
    check_host_offers(config, spec.offers, spec.prog or f"baselines/{spec.name}.py")
    check_ipc(dataset, config["ipc"], config["factor"], config["init"])
    check_places(spec, config, dataset, args.out)
    config["device"] = str(resolve_device(config["device"]))  # resume keeps this device
    config["environment"] = environment()
    return dataset, config


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


OPTIONAL_ON_RESUME = frozenset({"preset", "experts", "expert_seed", "expert_recipe",
                                "eval_compile", "world_size", "environment", "sources"})
"""Keys a run's config.json may lack and still resume (read with a default: runs written before
they existed); every other setting of the method must be there."""


def required_keys(spec: MethodSpec) -> set[str]:
    """The config keys a run of ``spec`` must record to be resumed: every setting of its command
    line (the plugins' options fall back to their defaults) and ``method``."""
    from .plugin_flags import plugin_option_table
    options = {option.key(plugin) for plugin, option in plugin_option_table()}
    keys = {_CONFIG_KEY.get(a.dest, a.dest) for a in build_parser(spec)._actions
            if a.dest not in (*_NOT_SETTINGS, "help")}
    return (keys | {"method"}) - options - OPTIONAL_ON_RESUME


def config_differences(recorded: dict, now: dict) -> list[str]:
    """The keys whose values differ between two configs (``sources`` and ``environment`` are
    bookkeeping, not settings; an optional key removed from ``now``, as in a run written before
    it existed, reads with its default and is no difference)."""
    keys = (set(recorded) | set(now)) - {"sources", "environment"}
    keys -= {k for k in OPTIONAL_ON_RESUME if k not in now}
    return sorted(k for k in keys if recorded.get(k, "<absent>") != now.get(k, "<absent>"))


def run(spec: MethodSpec, args: argparse.Namespace,
        explicit: frozenset[str] | set[str] = frozenset(), stop: "StopRequest | None" = None,
        world=None) -> int:
    """One run (new, or ``args.resume``): distil, save, evaluate. Raises user errors.

    ``world`` (a :class:`dm_plugins.distributed.World`, default one process): with K > 1
    processes every rank joins torchrun's process group (gloo on CPU, NCCL on CUDA), holds
    only its classes (:func:`dm_plugins.distributed.class_range`) of the real training images
    (all of them when the spec ``needs_every_class``) and of the synthetic set, and writes its own ``checkpoint-rank<r>.pt``. Rank 0 alone loads
    the data first (downloads and caches), creates the run directory and writes everything
    else (config, log, metrics, synthetic set, grid, curves, results). Missing experts are
    trained by every rank, expert k by rank k % K, and then loaded by all (the pool equals a
    serial one). The evaluation runs are dealt over the ranks and gathered. ``--resume``
    needs the same K.
    """
    from dm_plugins import ExpertPool, PluginSet, distributed, plugins_need_experts

    from .common import evaluate_stored, initial_synthetic, resolve_device, save_synthetic
    from .datasets import canonical_dataset_name, load_dataset
    from .errors import USER_ERRORS
    from .expert_cache import experts_directory, load_or_train_experts
    from .networks import get_network
    from .plugin_flags import check_plugin_flags, plugin_options
    from .runs import RunDir, RunError, peak_memory_mb
    from .guards import StopRequest, refuse_non_finite, warn_if_saturated
    from .validation import check_config

    stop = stop if stop is not None else StopRequest()
    world = world if world is not None else distributed.World()
    main_rank, sharded = world.is_main, world.distributed
    from dm_plugins.heartbeat import Heartbeat, bars_wanted
    progress = bars_wanted(args.no_progress) and main_rank
    created = False
    if args.resume:
        run_dir = RunDir.open(args.resume, world.rank, world.world_size, clean=main_rank)
        config = run_dir.read_config()
        if config.get("method", spec.name) != spec.name:
            raise RunError(f"{run_dir.path} holds a {config['method']!r} run, not a "
                           f"{spec.name!r} one; resume it with baselines/{config['method']}.py")
        _check_resume_flags(spec, args, explicit, config, run_dir.path)
        missing = sorted(required_keys(spec) - set(config))
        if missing:
            raise RunError(f"{run_dir.config_path} lacks {', '.join(missing)}; it was not "
                           f"written by this program or was edited; start a new run")
        recorded = int(config.get("world_size", 1))
        if recorded != world.world_size:
            raise RunError(f"{run_dir.path} was distilled by {recorded} process(es), this is "
                           f"{world.world_size}; resume it with {recorded} (e.g. "
                           f"{'python' if recorded == 1 else f'torchrun --nproc-per-node {recorded}'}"
                           f" ... --resume {run_dir.path})")
        device = distributed.init_process_group(world, resolve_device(config["device"]))
        distributed.main_first(world, run_dir.acquire if main_rank else lambda: None,
                               USER_ERRORS)
        stop.run_dir = run_dir  # main() releases the lock
        dataset = distributed.main_first(world, lambda: load_dataset(
            canonical_dataset_name(config["dataset"]), config["data_path"]), USER_ERRORS)
        check_config(config, spec.checks, image_size=dataset.image_size)
        check_plugin_flags(config)
        _check_processes(world, dataset, config["arch"])
    else:
        if sharded:
            device = distributed.init_process_group(world, resolve_device(args.device))
        dataset, config = distributed.main_first(
            world, lambda: new_run_config(spec, args, explicit), USER_ERRORS)
        _check_processes(world, dataset, config["arch"])
        config["world_size"] = world.world_size

        def create() -> RunDir:  # rank 0 only (it holds the lock); the others get its path
            return RunDir.create(args.out or unused_path(default_out(config)), config,
                                 world.rank, world.world_size)
        made = distributed.main_first(world, create if main_rank else lambda: None, USER_ERRORS)
        path = distributed.broadcast_object(str(made.path) if main_rank else None)
        run_dir = made if main_rank else RunDir(path, world.rank, world.world_size)
        created = main_rank
    stop.run_dir = run_dir
    if not sharded:
        device = resolve_device(config["device"])
    channels_last = use_channels_last(config["channels_last"], device)
    # a resume writes nothing into the run's log until its setup has succeeded (a refused
    # resume leaves the run as it was)
    log = _logger(run_dir, hold=not created) if main_rank else _silent
    log(f"run directory {run_dir.path}; dataset {dataset.name} "
        f"({dataset.num_classes} classes, {len(dataset.train)} train images); method "
        f"{config['method']}, preset {config.get('preset', config['method'])}; plugins "
        f"{','.join(config['plugins']) or 'none'}; device {device}"
        + (f"; {world.world_size} processes, classes sharded" if sharded else ""))

    def factory():
        return get_network(config["arch"], dataset.channels, dataset.num_classes,
                           dataset.image_size)

    def set_up():
        nonlocal dataset
        experts = None
        if spec.needs_experts or plugins_need_experts(config["plugins"]):
            expert_seed = config.get("expert_seed", config["seed"])
            experts = load_or_train_experts(  # missing experts dealt over the processes
                dataset, config["arch"], num_experts=config["num_experts"],
                epochs=config["expert_epochs"], seed=expert_seed,
                directory=experts_directory(config),
                recipe=config.get("expert_recipe", "ptlm"),
                device=device, progress=progress, channels_last=channels_last, log=log,
                rank=world.rank, world_size=world.world_size)[0]
            if expert_seed != config["seed"]:  # a shared pool; the per-iteration pick stays
                experts = ExpertPool(experts.experts, experts.network_factory,  # the run's own
                                     seed=config["seed"], meta=experts.meta)
        plugins = PluginSet.from_names(config["plugins"], options=plugin_options(config),
                                       experts=experts, compile=config["compile"])
        syn_init = initial_synthetic(dataset, config["ipc"], config["factor"], config["init"],
                                     config["seed"])
        extra = {"experts": experts} if spec.needs_experts else {}
        if sharded:  # this rank's classes only: its synthetic images and real images
            shard = distributed.ClassShard(dataset.num_classes, world.rank, world.world_size)
            first, last = shard.classes.start, shard.classes.stop
            syn_init = syn_init[first * config["ipc"]:last * config["ipc"]]
            if not spec.needs_every_class:
                dataset = dataclasses.replace(dataset, train=distributed.ShardedClassData
                                              .restrict(dataset.train, shard.classes))
            extra["shard"] = shard
        host = spec.build_host(dataset, factory, syn_init, plugins, config, device,
                               channels_last, **extra)
        if not sharded:
            checkpoint = run_dir.load_checkpoint()
            return experts, host, {} if checkpoint is None else {0: checkpoint}
        return experts, host, run_dir.load_checkpoints()

    def restore(checkpoint) -> None:
        changed = config_differences(checkpoint["config"], config) if "config" in checkpoint \
            else []
        if changed:
            raise RunError(f"{run_dir.config_path} changed since the run started "
                           f"({', '.join(changed)} differ from what its checkpoint recorded); "
                           f"restore those settings or start a new run")
        try:
            host.load_state_dict(checkpoint["host"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise RunError(f"{run_dir.checkpoint_path} does not fit the run described by "
                           f"{run_dir.config_path} ({str(exc).splitlines()[0]}); was "
                           f"config.json edited? Restore it or start a new run") from None

    errors = USER_ERRORS + (distributed.PeerFailed,)
    try:  # a setup failure of a new run leaves no half-made run directory behind
        experts, host, states = distributed.together(set_up, errors)
        checkpoint = _common_checkpoint(states, world, run_dir) if sharded else states.get(0)
        if checkpoint is not None:
            distributed.together(lambda: restore(checkpoint), errors)
    except errors:
        if created:
            run_dir.remove_unstarted()
        raise
    log.release()
    if main_rank and not created:  # records past the checkpoint (all, if none) are redone
        run_dir.truncate_metrics(host.iteration)
    if checkpoint is not None:
        stop.checkpoint = host.iteration
        log(f"resumed at iteration {host.iteration} of {config['iterations']}")

    beat = Heartbeat(log, "distill", config["iterations"], config["log_every"],
                     start=host.iteration) if not progress else None

    def after_iteration(t: int, metrics: dict) -> None:
        done = t + 1
        syn = getattr(host, "syn", None)
        stopping = stop.signum is not None
        if sharded:  # every rank takes the same decisions (losses are already summed)
            bad = isinstance(syn, torch.Tensor) and not bool(torch.isfinite(syn.detach()).all())
            stopping, bad = distributed.any_rank(stopping, bad)
            syn = torch.tensor(float("nan")) if bad else None
        refuse_non_finite(t, metrics, syn, config, stop)
        if t % config["log_every"] == 0 or done == config["iterations"]:
            metrics["peak_memory_mb"] = round(peak_memory_mb(device), 1)
            if sharded:
                peaks = distributed.all_gather_object(metrics["peak_memory_mb"])
                metrics["peak_memory_mb"] = max(peaks)
                metrics["peak_memory_mb_per_rank"] = peaks
            if main_rank:
                run_dir.append_metrics(metrics)
        if beat is not None:
            beat(done, **{k: v for k, v in metrics.items()
                          if k.startswith("loss") or k == "real_kept"})
        if (done % config["checkpoint_every"] == 0 or done == config["iterations"]
                or stopping):
            run_dir.save_checkpoint({"host": host.state_dict(), "iteration": done,
                                     "config": config})
            stop.checkpoint = done
        if stopping:
            raise KeyboardInterrupt

    started = time.perf_counter()
    stop.in_loop = True
    try:
        stored = host.run(callback=after_iteration, progress=progress)
    finally:
        stop.in_loop = False
    if getattr(host, "stores_pixels", False):  # e.g. DANCE: pixel space -> normalised
        stored = dataset.normalize(stored.detach().cpu())
    peak = f"{peak_memory_mb(device):.0f} MiB"
    if sharded:  # every rank gets the whole set, in class order
        stored = distributed.all_gather_rows(stored.detach())
        peaks = distributed.all_gather_object(round(peak_memory_mb(device)))
        peak = f"{max(peaks)} MiB (per process: {', '.join(map(str, peaks))})"
    log(f"distillation done: {config['iterations']} iterations in "
        f"{time.perf_counter() - started:.1f} s, peak memory {peak}")
    if main_rank:
        warn_if_saturated(dataset, stored, config, log)
        save_synthetic(run_dir, dataset, stored, ipc=config["ipc"], factor=config["factor"],
                       method=config["method"], plugins=config["plugins"], config=config,
                       seed=config["seed"])
        log(f"wrote {run_dir.synset_path} and {run_dir.grid_path}")
        write_curves(run_dir, log)
    if config["eval_runs"] > 0:
        results = evaluate_stored(
            dataset, stored, ipc=config["ipc"], factor=config["factor"],
            archs=config["eval_arch"], runs=config["eval_runs"], epochs=config["eval_epochs"],
            protocol=config["eval_protocol"], seed=config["seed"], device=device,
            progress=progress, channels_last=channels_last,
            compile=config.get("eval_compile", False), log=log, rank=world.rank,
            world_size=world.world_size, gather=distributed.all_gather_object)
        if not main_rank:
            return 0
        summary = dict(results[0])
        summary["per_arch"] = results
        summary.update({"method": config["method"], "plugins": config["plugins"],
                        "ipc": config["ipc"], "dataset": dataset.name,
                        "iterations": config["iterations"]})
        if "preset" in config:
            summary["preset"] = config["preset"]
        if experts is not None:
            summary["expert_test_accuracy"] = [e.meta.get("test_accuracy")
                                               for e in experts.experts]
        run_dir.write_results(summary)
        log(f"wrote {run_dir.results_path}")
    return 0


def _common_checkpoint(states: dict[int, dict], world, run_dir) -> dict | None:
    """The state of the latest iteration every process has a checkpoint of (each keeps its
    latest and previous one), None when no process has one; a RunError (on every rank) when
    the processes share none."""
    from dm_plugins import distributed

    from .runs import RunError
    everyone = distributed.all_gather_object(sorted(states))
    if not any(everyone):
        return None
    common = set.intersection(*map(set, everyone))
    if not common:
        raise RunError(f"the {world.world_size} processes' checkpoints in {run_dir.path} share "
                       f"no iteration ({'; '.join(f'rank {r}: {its}' for r, its in enumerate(everyone))}"
                       f"); delete every checkpoint-rank*.pt to restart the run")
    return states[max(common)]


def _check_processes(world, dataset, arch: str) -> None:
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


def write_curves(run_dir, log: Callable[[str], None]) -> None:
    """``curves.png`` of the run's ``metrics.jsonl`` (loss parts and ``real_kept`` over
    iterations, atomically); a failure to plot is a warning, never a failed run."""
    try:
        from .plots import plot_curves, read_metrics
        plot_curves([(run_dir.path.name, read_metrics(run_dir.metrics_path))],
                    run_dir.curves_path)
    except Exception as exc:  # noqa: BLE001 - plotting must never fail a finished run
        log(f"warning: could not write {run_dir.curves_path} ({type(exc).__name__}: {exc})")
        return
    log(f"wrote {run_dir.curves_path}")


class _Log:
    """Prints each message and appends it to ``run.log``; with ``hold``, the appends wait until
    :meth:`release` (messages of a resume that is then refused never reach the run's log)."""

    def __init__(self, run_dir, hold: bool = False):
        self.run_dir, self.held = run_dir, [] if hold else None

    def __call__(self, message: str) -> None:
        print(message, flush=True)
        if self.held is not None:
            self.held.append(message)
        else:
            self.run_dir.log(message)

    def release(self) -> None:
        held, self.held = self.held, None
        for message in held or ():
            self.run_dir.log(message)


class _Silent:
    def __call__(self, message: str) -> None:
        pass

    def release(self) -> None:
        pass


_silent = _Silent()


def _logger(run_dir, hold: bool = False) -> _Log:
    return _Log(run_dir, hold)
