#!/usr/bin/env python
"""DM (Zhao & Bilen, 2023) with optional PTLM plugins: ``python baselines/dm.py --preset ptlm``.

This file holds only what is DM's own: its defaults, the ``ptlm`` preset and how a DM host is
built (``adapters/dm.py``). The run driver (``baselines/harness/driver.py``) does the rest:
the shared command line, run directory and resume, experts, plugins, checkpoints, metrics,
saving and evaluation. ``torchrun --nproc-per-node K baselines/dm.py ...`` shards the classes
over K processes (``dm_plugins/distributed.py``; docs/distributed.md).
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from baselines.harness.cpu_threads import prefer_passive_wait  # noqa: E402

prefer_passive_wait()  # before torch loads OpenMP: passive wait when other jobs hold the cores

from baselines.harness import driver  # noqa: E402
from dm_plugins.loop import OFFERS  # noqa: E402
from baselines.harness.driver import EMBEDDED, HostRequest, MethodSpec, Preset, Rule  # noqa: E402,F401


def dm_image_lr(dataset, settings: dict) -> float:
    """DM's image learning rate: 1.0, or 10 from IPC 100 on."""
    return 10.0 if settings["ipc"] >= 100 else 1.0


def ptlm_image_lr(dataset, settings: dict) -> float:
    """PTLM's image lr, 0.01 x IPC in pixel space, in our normalised space: images are
    (x - mean) / std, so a pixel-space step of size s is a step of s / std^2 here (averaged
    over channels)."""
    mean_var = sum(s * s for s in dataset.std) / len(dataset.std)
    return 0.01 * settings["ipc"] / mean_var


DEFAULTS = {
    "iterations": 20000, "batch_real": 256, "factor": 1,
    "lr_img": Rule(dm_image_lr, "1.0, or 10 at IPC >= 100"),
    "momentum": 0.5, "plugins": "none", "num_experts": 5, "expert_epochs": 70,
    "eval_runs": 5, "eval_epochs": 1000,
}
"""The DM paper's settings (experts: PTLM's 5 x 70 epochs, used only by plugins needing them)."""

PRESETS = {
    "ptlm": Preset(
        "PTLM's settings: factor 2, image lr 0.01 x IPC in pixel space, plugins cap,ptm,plm "
        "unless --plugins is given (--preset ptlm --plugins none is the matched control)",
        {"factor": 2,
         "lr_img": Rule(ptlm_image_lr, "0.01 x IPC / mean(std_c^2), i.e. PTLM's 0.01 x IPC in "
                                       "pixel space"),
         "plugins": "cap,ptm,plm"}),    "iid": Preset(
        "IID's add-on (Deng et al., CVPR 2024) on DM, from the dm-plugins-iid package "
        "(pip install -e contrib/iid): plugins iid-cm,iid-cc unless --plugins is given, with "
        "the public DM code's weights lambda_CM 0.01, lambda_CC 0.05",
        {"plugins": "iid-cm,iid-cc", "iid_cm_weight": 0.01, "iid_cc_weight": 0.05}),
}


def build_host(request: HostRequest):
    """A :class:`dm_plugins.DMHost` for DM through ``adapters/dm.py`` (``request.shard``: this
    process's classes in a run of several processes, see ``dm_plugins/distributed.py``)."""
    from adapters.dm import build_dm_host
    config = request.config
    return build_dm_host(request.dataset, request.network_factory, request.syn_init,
                         plugins=request.plugins, iterations=config["iterations"],
                         batch_real=config["batch_real"], lr=config["lr_img"],
                         momentum=config["momentum"], factor=config["factor"],
                         seed=config["seed"], device=request.device, dsa=config["dsa"],
                         compile_real=config["compile"], compile_syn=config["compile"],
                         channels_last=request.channels_last, shard=request.shard)


SPEC = MethodSpec(
    name="dm",
    description="Distribution matching (DM) with optional PTLM plugins: capacity matching "
                "(cap), pseudo-trajectory matching (ptm), pseudo-label matching (plm). "
                "Defaults come from the method (the DM paper) or from --preset ptlm, never from "
                "which plugins are on. On the embedded 'digits' set some defaults are smaller "
                "so a run takes minutes on a CPU; those are marked [embedded].",
    defaults=DEFAULTS, build_host=build_host, presets=PRESETS, shards_classes=True,
    offers=OFFERS)


def build_parser():
    return driver.build_parser(SPEC)


def resolve_config(args, dataset, explicit=frozenset()) -> dict:
    return driver.resolve_config(SPEC, args, dataset, explicit)


default_out = driver.default_out
use_channels_last = driver.use_channels_last
_unused = driver.unused_path


def main(argv: list[str] | None = None) -> int:
    return driver.main(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
