"""The second phase of a run: the expert pool (when the method or a plugin needs it), the
plugins, the synthetic set's first state and the host, built through the method's
``build_host`` from one :class:`~baselines.harness.spec.HostRequest`; then the checkpoint, if
the run has one, restored into the host (:func:`build_run`, giving a :class:`BuiltRun`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import expert_cache
from .spec import HostRequest, call_build_host

if TYPE_CHECKING:  # pragma: no cover
    from dm_plugins import ExpertPool

    from .opening import OpenRun
    from .spec import Host


@dataclass
class BuiltRun:
    """The host, the expert pool it was given (or None) and the checkpoint restored (or
    None)."""

    host: "Host"
    experts: "ExpertPool | None"
    checkpoint: dict | None


def load_experts(run: "OpenRun") -> "ExpertPool | None":
    """The run's expert pool (loaded, or trained with missing experts dealt over the
    processes) when the method or a chosen plugin needs it, else None. A pool shared by runs of
    several seeds (``--expert-seed``) still picks experts by the run's own seed."""
    from dm_plugins import plugins_need_experts

    config = run.config
    if not (run.spec.needs_experts or plugins_need_experts(config["plugins"])):
        return None
    return _pool(run, config["arch"], expert_cache.experts_directory(config))


class ExpertPools:
    """The ``expert_pools`` resource plugins may accept (:data:`dm_plugins.options.RESOURCES`):
    ``pools(arch)`` is a pool of ``arch`` networks trained on the run's dataset with the run's
    expert settings (``--num-experts``, ``--expert-epochs``, ``--expert-recipe``,
    ``--expert-seed``), loaded from the default expert cache or trained there on first use,
    then kept. ``iid-cc --iid-cc-network resnet18`` asks for one."""

    def __init__(self, run: "OpenRun"):
        self.run, self._pools = run, {}

    def __call__(self, arch: str) -> "ExpertPool":
        if arch not in self._pools:
            config = dict(self.run.config, arch=arch, experts=None)
            self._pools[arch] = _pool(self.run, arch, expert_cache.experts_directory(config))
        return self._pools[arch]


def _pool(run: "OpenRun", arch: str, directory) -> "ExpertPool":
    """The run's pool of ``arch`` experts in ``directory`` (trained there when missing)."""
    from dm_plugins import ExpertPool

    config = run.config
    expert_seed = config.get("expert_seed", config["seed"])
    experts = expert_cache.load_or_train_experts(
        run.dataset, arch, num_experts=config["num_experts"],
        epochs=config["expert_epochs"], seed=expert_seed, directory=directory,
        recipe=config.get("expert_recipe", "ptlm"), device=run.device,
        progress=run.progress, channels_last=run.channels_last, log=run.log,
        rank=run.world.rank, world_size=run.world.world_size)[0]
    if expert_seed != config["seed"]:
        experts = ExpertPool(experts.experts, experts.network_factory, seed=config["seed"],
                             meta=experts.meta)
    return experts


def host_request(run: "OpenRun", experts) -> HostRequest:
    """What ``build_host`` gets: in a class-sharded run only this rank's classes of the
    synthetic set and (unless the spec ``needs_every_class``) of the real training images."""
    from dm_plugins import PluginSet, distributed

    from .common import initial_synthetic
    from .networks import get_network
    from .plugin_flags import plugin_options
    config, dataset = run.config, run.dataset

    def factory():
        return get_network(config["arch"], dataset.channels, dataset.num_classes,
                           dataset.image_size)

    plugins = PluginSet.from_names(config["plugins"], options=plugin_options(config),
                                   experts=experts, compile=config["compile"],
                                   expert_pools=ExpertPools(run))
    syn_init = initial_synthetic(dataset, config["ipc"], config["factor"], config["init"],
                                 config["seed"])
    shard = None
    if run.sharded:
        shard = distributed.ClassShard(dataset.num_classes, run.world.rank,
                                       run.world.world_size)
        first, last = shard.classes.start, shard.classes.stop
        syn_init = syn_init[first * config["ipc"]:last * config["ipc"]]
        if not run.spec.needs_every_class:
            dataset = dataclasses.replace(dataset, train=distributed.ShardedClassData
                                          .restrict(dataset.train, shard.classes))
    return HostRequest(dataset=dataset, network_factory=factory, syn_init=syn_init,
                       plugins=plugins, config=config, device=run.device,
                       channels_last=run.channels_last,
                       experts=experts if run.spec.needs_experts else None, shard=shard)


def check_declared(spec, host) -> None:
    """A TypeError when a host carries the older ``stores_pixels = True`` attribute that its
    spec does not declare: the driver reads the spec only, and would save pixel-space images
    as if they were normalised."""
    if getattr(host, "stores_pixels", spec.stores_pixels) != spec.stores_pixels:
        raise TypeError(f"{type(host).__name__}.stores_pixels is {host.stores_pixels} but "
                        f"MethodSpec {spec.name!r} says stores_pixels={spec.stores_pixels}; "
                        f"declare it on the MethodSpec")


def common_checkpoint(states: dict[int, dict], world, run_dir) -> dict | None:
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
        per_rank = "; ".join(f"rank {r}: {its}" for r, its in enumerate(everyone))
        raise RunError(f"the {world.world_size} processes' checkpoints in {run_dir.path} share "
                       f"no iteration ({per_rank}); delete every checkpoint-rank*.pt to "
                       f"restart the run")
    return states[max(common)]


def restore(run: "OpenRun", host: Any, checkpoint: dict) -> None:
    """Load ``checkpoint`` into ``host``; a RunError when config.json changed since the
    checkpoint was written, or the checkpoint does not fit the host."""
    from .resolve import config_differences
    from .runs import RunError
    run_dir = run.run_dir
    changed = (config_differences(checkpoint["config"], run.config) if "config" in checkpoint
               else [])
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


def build_run(run: "OpenRun") -> BuiltRun:
    """Experts, plugins and host, every rank together (a failure on one stops all), then the
    checkpoint restored; a new run's directory is removed again when this fails."""
    from dm_plugins import distributed

    from .errors import USER_ERRORS

    def set_up():
        experts = load_experts(run)
        host = call_build_host(run.spec.build_host, host_request(run, experts))
        check_declared(run.spec, host)
        if not run.sharded:
            checkpoint = run.run_dir.load_checkpoint()
            return experts, host, {} if checkpoint is None else {0: checkpoint}
        return experts, host, run.run_dir.load_checkpoints()

    errors = USER_ERRORS + (distributed.PeerFailed,)
    try:
        experts, host, states = distributed.together(set_up, errors)
        checkpoint = (common_checkpoint(states, run.world, run.run_dir) if run.sharded
                      else states.get(0))
        if checkpoint is not None:
            distributed.together(lambda: restore(run, host, checkpoint), errors)
    except errors:
        if run.created:
            run.run_dir.remove_unstarted()
        raise
    return BuiltRun(host=host, experts=experts, checkpoint=checkpoint)
