#!/usr/bin/env python
"""IDM (Zhao et al., CVPR 2023) with optional PTLM plugins: ``python baselines/idm.py``.

This file holds only what is IDM's own: its defaults (the authors' published commands), the
``ptlm`` preset, its extra arguments and how an IDM host is built (``adapters/idm.py``). The run
driver (``baselines/harness/driver.py``) does the rest.

``--factor`` is IDM's partition: 2 (the default) stores a 2x2 mosaic in every image; 1 turns
the partition off. Defaults that the authors set per dataset and IPC (``ce_weight``,
``batch_real``, ``net_generate_interval``, ``meter_interval``, ``model_train_steps``) follow
their commands for CIFAR-10 (and for any other dataset), CIFAR-100 and TinyImageNet.

``torchrun --nproc-per-node K baselines/idm.py ...`` shards the matching over K processes by
class; every process runs the whole model queue itself (replicated, on every class's real
images), so the gathered set equals one process's up to float rounding (see
``baselines/methods/idm.py``).
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from baselines.harness.cpu_threads import prefer_passive_wait  # noqa: E402

prefer_passive_wait()  # before torch loads OpenMP: passive wait when other jobs hold the cores

from baselines.harness import driver  # noqa: E402
from adapters.idm import OFFERS  # noqa: E402
from baselines.harness.driver import EMBEDDED_BUDGET, HostRequest, MethodSpec, Preset, Rule  # noqa: E402

REFERENCE = {
    "cifar10": {"ce_weight": (0.5, 0.5, 0.1), "batch_real": (5000, 256, 256),
                "net_generate_interval": (5, 30, 30), "meter_interval": (100, 100, 500),
                "model_train_steps": (10, 10, 10)},
    "cifar100": {"ce_weight": (0.5, 0.1, 0.1), "batch_real": (5000, 256, 256),
                 "net_generate_interval": (5, 30, 30), "meter_interval": (100, 100, 500),
                 "model_train_steps": (10, 50, 10)},
    "tinyimagenet": {"ce_weight": (0.5, 0.5, 0.8), "batch_real": (256, 256, 256),
                     "net_generate_interval": (30, 30, 30), "meter_interval": (100, 500, 1000),
                     "model_train_steps": (10, 10, 50)},
}
"""The authors' per-dataset settings at IPC 1 / 10 / 50 (their published commands); IPC up to 1,
below 50 and from 50 on take the three columns. Other datasets use the CIFAR-10 row."""


def reference_setting(key: str, dataset, settings: dict):
    row = REFERENCE.get(dataset.name, REFERENCE["cifar10"])[key]
    ipc = settings["ipc"]
    return row[0] if ipc <= 1 else row[1] if ipc < 50 else row[2]


def _rule(key: str, text: str) -> Rule:
    return Rule(lambda dataset, settings: reference_setting(key, dataset, settings), text)


DEFAULTS = {
    "iterations": 20000, "plugins": "none", "factor": 2, "lr_img": 0.2, "momentum": 0.5,
    "batch_real": _rule("batch_real", "256, or 5000 at IPC 1 on CIFAR"),
    "num_experts": 5, "expert_epochs": 70, "eval_runs": 5, "eval_epochs": 1000,
    "ce_weight": _rule("ce_weight", "CIFAR-10: 0.5, 0.1 at IPC >= 50; CIFAR-100: 0.5 at IPC 1, "
                                    "else 0.1; TinyImageNet: 0.5, 0.8 at IPC >= 50"),
    "net_generate_interval": _rule("net_generate_interval", "30, or 5 at IPC 1 on CIFAR"),
    "meter_interval": _rule("meter_interval", "100, or 500 at IPC >= 50 on CIFAR; "
                                              "TinyImageNet 100 / 500 / 1000"),
    "model_train_steps": _rule("model_train_steps", "10; 50 for CIFAR-100 at IPC 10 and "
                                                    "TinyImageNet at IPC 50"),
    "net_num": 100, "train_net_num": 1, "fetch_net_num": 2, "trained_bs": 256, "lr_net": 0.01,
}
"""IDM's settings (the authors' commands; experts: PTLM's 5 x 70 epochs, used only by plugins
needing them). Images live in normalised space, as in the authors' code, so lr 0.2 is theirs."""

PRESETS = {
    "ptlm": Preset(
        "PTLM's plugins on IDM: plugins cap,ptm,plm unless --plugins is given (--preset ptlm "
        "--plugins none is the matched control); IDM's own image lr 0.2 and 2x2 partition stay",
        {"plugins": "cap,ptm,plm"}),    "iid": Preset(
        "IID's add-on (Deng et al., CVPR 2024) on IDM, from the dm-plugins-iid package "
        "(pip install -e contrib/iid): plugins iid-cm,iid-cc unless --plugins is given, with "
        "the public IDM code's weights lambda_CM 0.03, lambda_CC 0.01",
        {"plugins": "iid-cm,iid-cc", "iid_cm_weight": 0.03, "iid_cc_weight": 0.01}),
}

EMBEDDED = {**EMBEDDED_BUDGET, "trained_bs": 64}
"""The shared embedded-dataset budget, plus smaller queue-training batches."""


def add_arguments(parser) -> None:
    """IDM's own settings; each default is resolved like the shared ones (see ``--help``)."""
    def d(key):
        return f"({driver.describe_default(SPEC, key)})"
    a = parser.add_argument_group("IDM").add_argument
    a("--ce-weight", type=float, default=None,
      help=f"class-aware term: weight x the matching queue net's running training accuracy "
           f"in percent x cross-entropy of the synthetic images {d('ce_weight')}")
    a("--net-num", type=int, default=None, help=f"model queue capacity {d('net_num')}")
    a("--net-generate-interval", type=int, default=None,
      help=f"iterations between pushes of a new random net {d('net_generate_interval')}")
    a("--train-net-num", type=int, default=None,
      help=f"queue nets that do the matching each iteration (the reference's train_net_num) "
           f"{d('train_net_num')}")
    a("--fetch-net-num", type=int, default=None,
      help=f"queue nets trained each iteration (the reference's fetch_net_num) "
           f"{d('fetch_net_num')}")
    a("--model-train-steps", type=int, default=None,
      help=f"SGD steps per trained queue net {d('model_train_steps')}")
    a("--trained-bs", type=int, default=None,
      help=f"un-augmented real images per queue-net training step {d('trained_bs')}")
    a("--lr-net", type=float, default=None,
      help=f"queue nets' SGD lr (momentum 0.9, weight decay 5e-4) {d('lr_net')}")
    a("--meter-interval", type=int, default=None,
      help=f"iterations between resets of the queue nets' accuracy meters (the reference's "
           f"eval_interval) {d('meter_interval')}")


def build_host(request: HostRequest):
    """An IDM host through ``adapters/idm.py`` (``request.shard``: this process's classes in a
    run of several processes)."""
    from adapters.idm import build_idm_host
    from baselines.harness.common import UsageError
    config = request.config
    try:
        return build_idm_host(
            request.dataset, request.network_factory, request.syn_init, plugins=request.plugins,
            factor=config["factor"], dsa=config["dsa"], device=request.device,
            num_iterations=config["iterations"], batch_real=config["batch_real"],
            lr=config["lr_img"], momentum=config["momentum"], ce_weight=config["ce_weight"],
            net_num=config["net_num"], net_generate_interval=config["net_generate_interval"],
            train_net_num=config["train_net_num"], fetch_net_num=config["fetch_net_num"],
            model_train_steps=config["model_train_steps"], trained_bs=config["trained_bs"],
            lr_net=config["lr_net"], meter_interval=config["meter_interval"],
            seed=config["seed"], channels_last=request.channels_last, shard=request.shard)
    except ValueError as exc:  # a setting IDM rejects, e.g. --net-num 0
        raise UsageError(str(exc)) from None


SPEC = MethodSpec(
    name="idm",
    description="Improved distribution matching (IDM: 2x2 partition, model queue trained "
                "alongside, class-aware CE term) with optional PTLM plugins: capacity "
                "matching (cap), pseudo-trajectory matching (ptm), pseudo-label matching (plm). "
                "Defaults come from the method (the authors' commands) or from --preset ptlm, "
                "never from which plugins are on. On the embedded 'digits' set some defaults "
                "are smaller so a run takes minutes on a CPU; those are marked [embedded].",
    defaults=DEFAULTS, build_host=build_host, add_arguments=add_arguments, presets=PRESETS,
    embedded_budget=EMBEDDED, shards_classes=True, offers=OFFERS, needs_every_class=True,
    supports_compile=False,  # its matching networks change every iteration
    checks={"ce_weight": "nonnegative", "net_num": "positive", "net_generate_interval": "positive",
            "train_net_num": "positive", "fetch_net_num": "nonnegative",
            # 0 steps would leave every queue net untrained: IDM without its queue training
            "model_train_steps": "positive", "trained_bs": "positive",
            "lr_net": "positive_float", "meter_interval": "positive"})


def build_parser():
    return driver.build_parser(SPEC)


def main(argv: list[str] | None = None) -> int:
    return driver.main(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
