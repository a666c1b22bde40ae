#!/usr/bin/env python
"""DANCE (Zhang et al., IJCAI 2024) with optional PTLM plugins: ``python baselines/dance.py``.

This file holds only what is DANCE's own: its defaults (the authors' reproduction settings),
the ``ptlm`` preset, its extra arguments and how a DANCE host is built (``adapters/dance.py``).
The run driver (``baselines/harness/driver.py``) does the rest, including the experts: DANCE
itself draws on the expert pool, so experts are trained (or read from the cache) for every run,
and the same pool serves the ``ptm`` and ``plm`` plugins.

Stored images live in pixel space [0, 1], so ``--lr-img`` is a pixel-space rate (DANCE's
``0.01 x IPC``). ``--factor`` is DANCE's multi-formation factor (2; 1 turns it off).

``torchrun --nproc-per-node K baselines/dance.py ...`` shards the classes over K processes (each
optimises its own classes' images with the single-process draws; the gathered set equals one
process's up to float rounding; see ``baselines/methods/dance.py``).
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from baselines.harness.cpu_threads import prefer_passive_wait  # noqa: E402

prefer_passive_wait()  # before torch loads OpenMP: passive wait when other jobs hold the cores

from baselines.harness import driver  # noqa: E402
from adapters.dance import OFFERS  # noqa: E402
from baselines.harness.driver import HostRequest, MethodSpec, Preset, Rule  # noqa: E402


def dance_image_lr(dataset, settings: dict) -> float:
    """DANCE's image learning rate, 0.01 x IPC in pixel space (0.1 x IPC on ImageNet subsets)."""
    scale = 0.1 if dataset.name.startswith("image") and dataset.image_size >= 128 else 0.01
    return scale * settings["ipc"]


DEFAULTS = {
    "iterations": 10000, "plugins": "none", "factor": 2,
    "lr_img": Rule(dance_image_lr, "0.01 x IPC in pixel space (0.1 x IPC at 128 px)"),
    "momentum": 0.5, "batch_real": 128, "num_experts": 5, "expert_epochs": 60,
    "eval_runs": 5, "eval_epochs": 1500, "eval_protocol": "dance",
    "batch_syn_max": 200, "iter_calib": 1,
}
"""DANCE's settings (the authors' reproduction arguments for 32-px datasets): 10,000
iterations, 128 real images per class, at most 200 decoded synthetic images per class and step,
one inter-class pass, 5 experts of 60 epochs, evaluation 1,500 epochs with DANCE's protocol
(batch 64, lr x0.2 at 2/3 and 5/6, IDC's colour and crop, CutMix)."""

PTLM_CODE = {
    "plugins": "cap,ptm,plm",
    "cap_end": 0.5, "cap_alpha": 200,              # progress (t // 2) / 10000; typical up to IPC 100
    "ptm_lam": 2.0,                                # l = (T - t/2) / T, i.e. r = t / (2T)
    "plm_logits": "extractor", "plm_target": "batch",  # interval net; current real batch
    "plm_sharpen": "sum", "plm_tau": 0.01,         # softmax(sum of correct softmaxes / 0.01)
    "plm_step": "separate", "plm_lr": 0.01,        # its own SGD, lr 0.01, DANCE's momentum
    "eval_protocol": "dance",
}
"""The public PTLM code's reading (``PTLM.py`` in the GitHub repository CSliuyt/test, a copy of
DANCE's condensation script); docs/methods.md#two-readings-of-ptlm lists each point. DANCE's
iterations, experts and evaluation are this method's own defaults, so they are not repeated
here (and the embedded dataset's small budget still applies on digits)."""

PRESETS = {
    "ptlm": Preset(
        "PTLM's plugins on DANCE as the paper's text reads them: plugins cap,ptm,plm unless "
        "--plugins is given (--preset ptlm --plugins none is the matched control); DANCE's "
        "image lr (0.01 x IPC, which is also PTLM's) and factor 2 stay",
        {"plugins": "cap,ptm,plm"}),
    "ptlm-code": Preset(
        "PTLM as its one public implementation runs it (a DANCE fork): cap with schedule end "
        "0.5 and the typical rule up to IPC 199, ptm with lambda 2, plm through the matching "
        "network against the current real batch's summed predictions / 0.01 in a separate "
        "step (lr 0.01); DANCE's iterations, experts and evaluation",
        PTLM_CODE),
}


def add_arguments(parser) -> None:
    """DANCE's own settings."""
    def d(key):
        return f"({driver.describe_default(SPEC, key)})"
    a = parser.add_argument_group("DANCE").add_argument
    a("--batch-syn-max", type=int, default=None,
      help=f"most decoded synthetic images per class in a step; a random subset beyond "
           f"{d('batch_syn_max')}")
    a("--iter-calib", type=int, default=None,
      help=f"inter-class (hard-label CE through the trained expert) passes per iteration; "
           f"0 turns the inter-class view off {d('iter_calib')}")


def build_host(request: HostRequest):
    """A DANCE host through ``adapters/dance.py`` (``request.shard``: this process's classes in
    a run of several processes); its ``run`` returns pixel-space images (``stores_pixels``)."""
    from adapters.dance import build_dance_host
    from baselines.harness.common import UsageError
    config = request.config
    try:
        return build_dance_host(
            request.dataset, request.experts, request.syn_init, plugins=request.plugins,
            factor=config["factor"], augment=config["dsa"], device=request.device,
            num_iterations=config["iterations"], batch_real=config["batch_real"],
            batch_syn_max=config["batch_syn_max"], lr=config["lr_img"],
            momentum=config["momentum"], iter_calib=config["iter_calib"], seed=config["seed"],
            channels_last=request.channels_last, shard=request.shard)
    except ValueError as exc:  # a setting DANCE rejects, e.g. --batch-syn-max 0
        raise UsageError(str(exc)) from None


SPEC = MethodSpec(
    name="dance",
    description="DANCE (dual-view distribution alignment: inner-class matching on a random "
                "mixture of an expert's initial and trained weights, inter-class CE through "
                "the trained expert) with optional PTLM plugins: capacity matching (cap), "
                "pseudo-trajectory matching (ptm), pseudo-label matching (plm). Defaults come "
                "from the method (the authors' settings) or from --preset ptlm, never from "
                "which plugins are on. On the embedded 'digits' set some defaults are smaller "
                "so a run takes minutes on a CPU; those are marked [embedded].",
    defaults=DEFAULTS, build_host=build_host, add_arguments=add_arguments, presets=PRESETS,
    needs_experts=True, checks={"batch_syn_max": "positive", "iter_calib": "nonnegative"},
    shards_classes=True, offers=OFFERS, stores_pixels=True,
    supports_compile=False)  # its matching network changes every iteration


def build_parser():
    return driver.build_parser(SPEC)


def main(argv: list[str] | None = None) -> int:
    return driver.main(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
