"""The settings every distillation command line shares, as one declarative table.

Each :class:`Setting` row names a flag (its argparse dest), its type, default and help, the
config.json key it is recorded under, how its value is written there, and whether ``--resume``
may give it again. The parser (:mod:`baselines.harness.command_line`), default resolution with
provenance, ``config.json``, a ``--config`` file's reading and the resume check all come from
this table, so a new shared flag is one row. A method's own arguments
(:attr:`MethodSpec.add_arguments`) and the plugins' options (``--<plugin>-<option>``) are
settings too, recorded under their dest as given.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .cpu_threads import positive_threads
from .spec import EMBEDDED, MethodSpec

__all__ = ["Setting", "SETTINGS", "BY_DEST", "config_key", "to_config", "from_config"]

SAME, FREE, REFUSED = "same", "free", "refused"
"""What ``--resume`` does with a flag given again: it must equal the recorded value (SAME),
it may differ since it is not a setting of the run (FREE), or it cannot be given (REFUSED)."""


def _identity(value: Any, values: dict) -> Any:
    return value


def _comma_list(value: Any, values: dict) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(s) for s in value]
    return [s.strip() for s in str(value).split(",") if s.strip()]


def _plugin_names(value: Any, values: dict) -> list[str]:
    from dm_plugins import check_plugin_names
    return check_plugin_names(list(value) if isinstance(value, (list, tuple)) else value)


def _iteration_list(text: str) -> list[int]:
    """``--eval-at``'s argparse type: ``"0,250,500"`` -> ``[0, 250, 500]`` (an empty string, no
    points); a part that is not a whole number >= 0 is an argparse error (one line, exit 2)."""
    import argparse
    points = []
    for part in (s.strip() for s in str(text).split(",")):
        if not part:
            continue
        if not part.isdigit():
            raise argparse.ArgumentTypeError(f"not an iteration (a whole number >= 0): {part!r}")
        points.append(int(part))
    return sorted(set(points))


def _iterations_written(value: Any, values: dict) -> Any:
    if isinstance(value, str):
        return _iteration_list(value)
    return sorted(set(value)) if isinstance(value, (list, tuple)) else value


def _joined(value: Any) -> Any:
    return ",".join(map(str, value)) if isinstance(value, list) else value


@dataclass(frozen=True)
class Setting:
    """One shared flag.

    Attributes:
        dest: the argparse destination (``--lr-img`` -> ``lr_img``).
        help: the help text; ``{d}`` becomes ``(<default; [embedded] ...; preset ...>)`` of the
            method, ``{name}`` the method's name; a callable gets the spec.
        type / choices / metavar: as in argparse (``choices`` may be a callable of the spec).
        default: the parser default, or a callable of the spec.
        flag: a ``store_true`` switch.
        key: the config.json key (default ``dest``).
        record: recorded in config.json and its ``sources`` (False for what is not a setting
            of the run: ``--out``, ``--resume``, ``--no-progress``, ...).
        write: the value config.json records, from the parsed value and every parsed value by
            dest; ``read`` the inverse, for a ``--config`` file.
        on_resume: :data:`SAME`, :data:`FREE` or :data:`REFUSED`.
        resume_ignores: a given value ``--resume`` accepts whatever was recorded (``--device
            auto``).
        only_if: the row exists only for specs where this holds (``--nproc-per-node``).
    """

    dest: str
    help: str | Callable[[MethodSpec], str]
    type: Callable[[str], Any] | None = None
    default: Any = None
    choices: Sequence[str] | Callable[[MethodSpec], Sequence[str]] | None = None
    metavar: str | None = None
    flag: bool = False
    key: str | None = None
    record: bool = True
    write: Callable[[Any, dict], Any] = _identity
    read: Callable[[Any], Any] = lambda value: value
    on_resume: str = SAME
    resume_ignores: Any = None
    only_if: Callable[[MethodSpec], bool] | None = None

    @property
    def config_key(self) -> str:
        return self.key or self.dest

    @property
    def option(self) -> str:
        return "--" + self.dest.replace("_", "-")


def _expert_recipe_help(spec: MethodSpec) -> str:
    from .expert_cache import RECIPES
    return "how experts are trained: " + "; ".join(f"{k}: {v}" for k, v in RECIPES.items())


def _expert_recipe_default(spec: MethodSpec) -> str:
    from .expert_cache import DEFAULT_RECIPE
    return spec.defaults.get("expert_recipe", DEFAULT_RECIPE)


def _expert_recipes(spec: MethodSpec) -> list[str]:
    from .expert_cache import RECIPES
    return sorted(RECIPES)


def _preset_help(spec: MethodSpec) -> str:
    presets = "; ".join([f"{spec.name}: the method's own defaults"] +
                        [f"{name}: {p.description}" for name, p in spec.presets.items()])
    return (f"where unset hyperparameters take their defaults from: {presets}. Precedence: "
            f"command line > preset > [embedded] budget > method default; config.json records "
            f"each value's source")


SETTINGS: tuple[Setting, ...] = (
    Setting("dataset", "digits (embedded, offline), mnist, fashion-mnist, cifar10, cifar100, "
            "tinyimagenet, imagenette/imagewoof/imagemeow/imagesquawk/imagefruit/imageyellow, "
            "or imagefolder:PATH (PATH/train/<class>/*, PATH/test/<class>/*)",
            default=EMBEDDED),
    Setting("data_path", "where torchvision/TinyImageNet/ImageNet files live", default="data"),
    Setting("ipc", "stored synthetic images per class", type=int, default=10),
    Setting("preset", _preset_help, default=lambda spec: spec.name,
            choices=lambda spec: spec.preset_names, record=False),
    Setting("iterations", "distillation iterations T {d}", type=int),
    Setting("plugins", "comma list of cap, ptm, plm (or third-party names), or 'none' {d}",
            write=_plugin_names,
            read=lambda v: (",".join(map(str, v)) or "none") if isinstance(v, list) else v),
    Setting("experts", "expert directory for methods and plugins that need experts (dance, "
            "ptm, plm); trained and saved there if empty (default: a cache entry under "
            "./experts keyed by dataset, arch, epochs, seed; env DM_PLUGINS_EXPERTS moves the "
            "cache root)"),
    Setting("num_experts", "experts to train/use {d}", type=int),
    Setting("expert_epochs", "epochs per expert {d}", type=int),
    Setting("expert_recipe", _expert_recipe_help, default=_expert_recipe_default,
            choices=_expert_recipes),
    Setting("expert_seed", "the expert pool's seed, part of its cache key (default: --seed); "
            "runs of several seeds share one pool when given the same --expert-seed", type=int,
            write=lambda value, values: values["seed"] if value is None else value),
    Setting("arch", "distillation / expert network", default="convnet"),
    Setting("factor", "factorisation factor f: each stored image holds f x f images {d}",
            type=int),
    Setting("lr_img", "image learning rate (in the space the method stores images in: "
            "normalised for dm and idm, pixels in [0, 1] for dance) {d}", type=float),
    Setting("momentum", "image optimiser momentum {d}", type=float),
    Setting("batch_real", "real images per class per iteration {d}", type=int),
    Setting("init", "synthetic initialisation", default="real", choices=("real", "noise")),
    Setting("no_dsa", "turn off DSA augmentation during distillation", flag=True, key="dsa",
            write=lambda value, values: not value, read=lambda value: not bool(value)),
    Setting("seed", "run seed: same seed, same synthetic set on CPU", type=int, default=0),
    Setting("device", "cpu, cuda or auto", default="auto", resume_ignores="auto"),
    Setting("out", "run directory (default runs/{name}[-<preset>]-<dataset>-ipc<ipc>-<plugins>-"
            "s<seed>, the preset named when not {name}; -2, -3, ... appended when taken)",
            record=False, on_resume=REFUSED),
    Setting("resume", "continue the run in RUN_DIR from its last checkpoint (its config.json "
            "wins)", metavar="RUN_DIR", record=False, on_resume=FREE),
    Setting("config", "settings from a JSON file (config.json's keys; a previous run's "
            "config.json works as is; the files in configs/ hold the paper's rows), below the "
            "command line and above the preset in precedence", metavar="FILE", record=False,
            on_resume=FREE),
    Setting("nproc_per_node", "start N processes on this machine (classes sharded, as torchrun "
            "--nproc-per-node N) and exit with their own code; torchrun for several machines",
            type=int, metavar="N", record=False, on_resume=FREE,
            only_if=lambda spec: spec.shards_classes),
    Setting("print_config", "print the resolved settings with their sources as JSON and exit "
            "(nothing is written)", flag=True, record=False, on_resume=FREE),
    Setting("eval_runs", "evaluation runs, 0 skips {d}", type=int),
    Setting("eval_epochs", "epochs per evaluation run {d}", type=int),
    Setting("eval_arch", "comma list: convnet, resnet10, resnet18, densenet121",
            default="convnet", write=_comma_list, read=_joined),
    Setting("eval_protocol", "dm: DM's (batch 256, lr x0.1 at half, per-image DSA); dance: "
            "DANCE's (batch 64, lr x0.2 at 2/3 and 5/6, IDC's per-image colour+crop, CutMix p "
            "0.5); dsa-cutmix: dm plus CutMix p 0.5 (called dance before 2026-12-04)",
            default=lambda spec: spec.defaults.get("eval_protocol", "dm"),
            choices=("dm", "dance", "dsa-cutmix")),
    Setting("eval_at", "comma list of iterations whose synthetic set is kept "
            "(RUN/snapshots/) and evaluated like the final one, for an accuracy-vs-iteration "
            "curve in results.json; 0 is the initial set", type=_iteration_list, default="",
            metavar="T1,T2,...", write=_iterations_written, read=_joined),
    Setting("eval_every", "also keep and evaluate the set every N iterations (0, N, 2N, ... "
            "and the last), as the original DM code does with N = 2000; 0: none", type=int,
            default=0, metavar="N"),
    Setting("channels_last", "channels-last memory format for the networks; auto = on for CPU "
            "(measured faster, see docs/benchmarks.md), off for CUDA", default="auto",
            choices=("auto", "on", "off")),
    Setting("compile", "torch.compile the distillation forwards: real images, synthetic images "
            "(with their backward) and plm's expert (a one-off compile time, then faster "
            "iterations)", flag=True),
    Setting("eval_compile", "torch.compile each evaluation network (about 20 s once per run on "
            "a CPU, then faster epochs: 1.34 against 1.86 s an epoch on a 400-image set, 1 CPU "
            "thread)", flag=True),
    Setting("checkpoint_every", "iterations between checkpoints", type=int, default=100),
    Setting("log_every", "iterations between metrics.jsonl records", type=int, default=10),
    Setting("threads", "CPU threads for torch (default: torch's own choice, the physical cores or "
            "OMP_NUM_THREADS); idle threads wait passively unless OMP_WAIT_POLICY is set "
            "(config.json's environment records both)", type=positive_threads, metavar="N",
            record=False, on_resume=FREE),
    Setting("no_progress", "no progress bars", flag=True, record=False, on_resume=FREE),
)
"""The shared settings, in ``--help`` order; config.json records them in this order too."""

BY_DEST = {row.dest: row for row in SETTINGS}


def config_key(dest: str) -> str:
    """The config.json key of an argparse destination (a method's own arguments and the
    plugins' options are recorded under their dest)."""
    row = BY_DEST.get(dest)
    return row.config_key if row else dest


def to_config(dest: str, value: Any, values: dict) -> Any:
    """What config.json records for ``dest``'s parsed ``value`` (``values``: every parsed value
    by dest)."""
    row = BY_DEST.get(dest)
    return row.write(value, values) if row else value


def from_config(key: str, value: Any) -> tuple[str, Any]:
    """``(dest, parsed value)`` of a config.json entry (the inverse of :func:`to_config`)."""
    for row in SETTINGS:
        if row.config_key == key:
            return row.dest, row.read(value)
    return key, value
