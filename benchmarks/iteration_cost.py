#!/usr/bin/env python
"""Per-iteration cost of distillation: seconds per iteration and peak memory (paper Table 6).

In one process, on the same data and seed, times the steady state of one distillation iteration
(warm-up excluded, median over repeats; the variants run round-robin, iteration by iteration,
so that drift in machine speed affects them alike) for:

- ``naive``:      per-class DM as the original code does it (new network, per-class DSA,
                  per-class forwards), :func:`dm_plugins.reference.naive_dm_iteration`;
- ``host-nchw``:  our batched DM host, default memory format, no plugins;
- ``host-unchunked``: the host with the real and synthetic forwards in one batch each, all
                  classes' real images at once (the first round's host);
- ``host-eager``: ``host`` never compiled (the eager reference of a ``--compile`` run);
- ``host``:       our DM host with this machine's fast settings (channels-last, the real
                  forward in chunks of the device's default size, fused with the class means;
                  ``--compile`` adds torch.compile of the real and synthetic forwards and of
                  PLM's expert forward), no plugins;
- ``cap``, ``ptm``, ``plm``: that host with one plugin; ``all``: with cap, ptm and plm;
- ``idm``:        IDM (``adapters/idm.py``, channels-last) with its own queue settings: one
                  matching net, per-class image steps, then 2 queue nets trained 10 steps on 256
                  real images; ``idm+all``: IDM with cap, ptm and plm. Both use the shared
                  ``--batch-real`` and ``--factor`` (pass ``--factor 2`` for IDM's own 2x2
                  partition); ``--compile`` does not apply to them.
- ``dance``:      DANCE (``adapters/dance.py``, channels-last): the middle model, per-class
                  matching steps, per-class CE steps through the trained expert (image lr
                  0.01 x IPC, at most 200 decoded images per class); ``dance+all``: DANCE with
                  cap, ptm and plm (plm in place of the CE step). Shared ``--batch-real`` and
                  ``--factor`` (DANCE's own: 128 and 2); no ``--compile``;
                  ``dance+ptlm-code``: DANCE with the three plugins as the public PTLM code
                  reads them (``baselines/dance.py --preset ptlm-code``: plm through the
                  matching network against the current real batch, in a separate step).
- ``dm-preset``:  what a DM user runs: the host at factor 1, no plugins;
  ``ptlm-preset``: what a PTLM user runs: the host at factor 2 with cap, ptm and plm
                  (both ignore ``--factor``; their ratio is the price of PTLM).

Stage breakdown: for the DM host variants (not ``naive``) each stage of the steady
iterations is timed (:class:`dm_plugins.profiling.StageTimer`; on CUDA it synchronises around
each stage) and printed as seconds per iteration: extractor (PTM's interpolation or a fresh
random network), real batch sampling, real augmentation, real forward, synthetic decode +
augmentation + forward, cap's filter, auxiliary losses (PLM's expert forward), backward (of the
matching and auxiliary losses together), optimiser step. IDM and DANCE get a table each with
their own stages (:data:`METHOD_STAGES`): IDM's extractor, real pass (real batches, DSA and
forward), class losses (synthetic path, CE and plugin losses), matching passes (those two plus
the per-class backward and image step) and queue training; DANCE's extractor (the middle model,
or PTM's), inner-class losses, inter-class losses (CE, or PLM) and the rest (its backward and
image steps).

``--chunk-sweep 8,16,32,...`` times only the no-graph real forward of ``batch_real`` images per
class under a random extractor at each chunk size (round-robin, median) and prints it: the
measurement behind :func:`dm_plugins.chunking.default_real_chunk`.

Peak memory: CUDA max allocated on GPU; on CPU the peak resident set size of the process,
reset before each iteration through /proc/self/clear_refs (Linux); a variant's number is the
largest peak over its iterations (it includes the process baseline: Python, torch, the data and
every variant's small persistent state). The iteration memory is that peak minus the memory
just before the iteration: what the iteration itself adds, comparable across ``--classes``.

It prints a table and writes JSON. It measures; it asserts nothing about speed. The headline is
the ratio of each variant to ``naive``, and ``all`` to ``host``.

Experts: by default random networks stand in for trained experts (two random weight sets per
expert); the cost of PTM and PLM does not depend on how well an expert was trained. Pass
``--experts DIR`` to use a trained pool.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from baselines.harness.cpu_threads import (apply_threads, describe, positive_threads,  # noqa: E402
                                           prefer_passive_wait)
from benchmarks.contention import BusyWorkers, compare, contend_from_argv  # noqa: E402

# --contend's workers start first: the wait-policy choice below must see them, as it would see
# other users' jobs already running
_WORKERS = BusyWorkers(contend_from_argv(sys.argv[1:]) if __name__ == "__main__" else 0).start()
prefer_passive_wait()  # before torch loads OpenMP, as every command line does

import torch  # noqa: E402

from baselines.harness.launch import strip_flag  # noqa: E402

VARIANTS = ("naive", "host-nchw", "host-unchunked", "host-eager", "host", "cap", "ptm", "plm", "all",
            "iid-cm", "iid-cc", "dm-preset", "ptlm-preset", "idm", "idm+all", "idm+iid-cm",
            "dance", "dance+all", "dance+ptlm-code")
PLUGINS = {"naive": None, "host-nchw": "none", "host-unchunked": "none", "host-eager": "none", "host": "none",
           "cap": "cap", "ptm": "ptm", "plm": "plm", "all": "cap,ptm,plm", "dm-preset": "none",
           "ptlm-preset": "cap,ptm,plm", "idm": "none", "idm+all": "cap,ptm,plm",
           "dance": "none", "dance+all": "cap,ptm,plm", "dance+ptlm-code": "cap,ptm,plm",
           "iid-cm": "iid-cm", "iid-cc": "iid-cc", "idm+iid-cm": "iid-cm"}
"""The plugins of each variant (``iid-*``: the dm-plugins-iid package, ``contrib/iid``)."""
PRESET_FACTOR = {"dm-preset": 1, "ptlm-preset": 2}
NEVER_COMPILED = ("naive", "host-nchw", "host-unchunked", "host-eager")  # references: eager
STAGES = ("extractor", "real_batch", "augment_real", "real_forward", "synthetic_forward", "cap",
          "feature_losses", "auxiliary_losses", "backward", "optimizer_step")
METHOD_STAGES = {
    # stage -> the host method timed (inclusive wall time of its calls in an iteration)
    "idm": {"extractor": "matching_extractor", "real_pass": "prepare_pass",
            "class_losses": "class_loss", "matching_passes": "matching_pass",
            "queue_training": "train_queue"},
    "dance": {"extractor": "matching_extractor", "inner_losses": "inner_class_loss",
              "inter_losses": "inter_class_losses"},
}
"""The IDM and DANCE stages: their method code is left untouched and these methods are wrapped
on the benchmark's host instance. ``matching_passes`` includes ``real_pass`` and
``class_losses``; the rest of it is IDM's per-class backward and image step. Each table also
gets ``rest``: the mean iteration time minus the stages of :data:`TOP_STAGES` (for DANCE, its
per-class backward and image steps)."""
TOP_STAGES = {"idm": ("matching_passes", "queue_training"),
              "dance": ("extractor", "inner_losses", "inter_losses")}


def time_methods(host, stages: dict, timer) -> None:
    """Wrap each ``host.<method>`` of ``stages`` (stage -> method name) on the instance so its
    calls add to ``timer``'s stage."""
    for stage, name in stages.items():
        method = getattr(host, name)

        def timed(*a, _method=method, _stage=stage, **k):
            with timer(_stage):
                return _method(*a, **k)
        setattr(host, name, timed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="synthetic",
                   help="'synthetic' (random CIFAR-10-sized tensors, offline) or a harness "
                        "dataset name such as imagefolder:PATH")
    p.add_argument("--data-path", default="data")
    p.add_argument("--ipc", default="1,10,50", help="comma list of IPC values")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    p.add_argument("--batch-real", type=int, default=256)
    p.add_argument("--factor", type=int, default=1)
    p.add_argument("--arch", default="convnet")
    p.add_argument("--width", type=int, default=None, help="network width (ConvNet: 128)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--num-experts", type=int, default=5)
    p.add_argument("--experts", default=None, help="a trained expert directory (optional)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the real forward, the synthetic forward and PLM's expert "
                        "in the DM host variants (not host-nchw/host-unchunked); the compile "
                        "time shows as the first iteration's excess over the steady median")
    p.add_argument("--no-dsa", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="output JSON (default benchmarks/results/iteration_cost-<device>.json)")
    p.add_argument("--synthetic-size", type=int, default=32, help="image size of the synthetic data")
    p.add_argument("--synthetic-per-class", type=int, default=300)
    p.add_argument("--classes", type=int, default=10,
                   help="number of classes of the synthetic data (100: CIFAR-100-sized)")
    p.add_argument("--syn-chunk", type=int, default=None,
                   help="synthetic-forward chunk of the DM host variants and PLM (activation "
                        "checkpointing; default: the device's, dm_plugins.chunking.DEFAULT_SYN_CHUNK)")
    p.add_argument("--eval-speed", type=int, default=None, metavar="EPOCHS",
                   help="time the evaluation instead (training a fresh network on an IPC-10, "
                        "factor-2 set: 400 images) for EPOCHS epochs, default vs channels-last")
    p.add_argument("--chunk-sweep", default=None,
                   help="comma list of real-forward chunk sizes to time instead of the variants")
    p.add_argument("--threads", type=positive_threads, default=None, metavar="N",
                   help="torch threads (default: torch's own choice)")
    p.add_argument("--contend", type=int, default=0, metavar="K",
                   help="run K single-threaded busy workers beside the measurement, started "
                        "before torch loads (so the wait-policy choice sees them, as it would "
                        "see other users' jobs) and stopped at the end")
    p.add_argument("--compare-contention", type=int, default=None, metavar="K",
                   help="instead: rerun this command quiet and beside K busy workers, with the "
                        "command lines' own wait-policy choice, OpenMP's default wait and one "
                        "thread, one child process each, and print one table "
                        "(benchmarks/contention.py)")
    return p


def load_data(args):
    from baselines.harness.datasets import Dataset, load_dataset
    from dm_plugins import ClassIndexedTensors
    if args.dataset != "synthetic":
        return load_dataset(args.dataset, args.data_path)
    g = torch.Generator().manual_seed(args.seed)
    n, s = args.synthetic_per_class, args.synthetic_size
    k = args.classes
    images = torch.randn(k * n, 3, s, s, generator=g)
    labels = torch.arange(k).repeat_interleave(n)
    split = ClassIndexedTensors(images, labels, k)
    return Dataset(f"synthetic-{k}", split, split, (0.0,) * 3, (1.0,) * 3,
                   [str(i) for i in range(k)])


def random_experts(factory, num, seed):
    from dm_plugins import Expert, ExpertPool
    experts = []
    for k in range(num):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + 2 * k)
            init = {n: v.clone() for n, v in factory().state_dict().items()}
            torch.manual_seed(seed * 1000 + 2 * k + 1)
            star = {n: v.clone() for n, v in factory().state_dict().items()}
        experts.append(Expert(init, star, {"note": "random stand-in"}))
    return ExpertPool(experts, factory, seed=seed)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_stepper(variant, data, factory, experts, ipc, args, device):
    """``(step, close, timer)``: ``step(t)`` runs one iteration of ``variant``; ``timer`` is its
    :class:`StageTimer` (None for variants without a stage breakdown)."""
    from adapters.dm import build_dm_host
    from baselines.harness.common import initial_synthetic
    from baselines.harness.dsa import DSA
    from dm_plugins import PluginSet
    from dm_plugins.profiling import StageTimer
    from dm_plugins.reference import naive_dm_iteration

    factor = PRESET_FACTOR.get(variant, args.factor)
    syn_init = initial_synthetic(data, ipc, factor, "real", args.seed)
    if variant == "naive":
        syn = syn_init.clone().to(device).requires_grad_(True)
        opt = torch.optim.SGD([syn], lr=1.0, momentum=0.5)
        augment = None if args.no_dsa else DSA(flip=not data.is_digit_like).siamese

        def step(t):
            naive_dm_iteration(data.train, factory, syn, opt, ipc=ipc,
                               batch_real=args.batch_real, augment=augment, seed=args.seed,
                               iteration=t, device=device)
        return step, lambda: None, None
    # lazy=False: PLM's pseudo-labels are a one-off setup cost, kept out of the timed iterations
    options = {}
    if variant == "dance+ptlm-code":  # the preset's plugin options, read as a run reads them
        from baselines.dance import PTLM_CODE
        from baselines.harness.plugin_flags import plugin_options
        options = plugin_options({**PTLM_CODE, "plugins": PLUGINS[variant].split(",")})
    plugins = PluginSet.from_names(PLUGINS[variant], options=options, experts=experts, lazy=False,
                                   chunk=args.syn_chunk,
                                   compile=args.compile and variant not in NEVER_COMPILED
                                   and not variant.startswith(("idm", "dance")))
    if variant.startswith("idm"):
        from adapters.idm import build_idm_host
        host = build_idm_host(data, factory, syn_init, plugins=plugins, factor=args.factor,
                              dsa=not args.no_dsa, device=device,
                              num_iterations=args.warmup + args.repeats,
                              batch_real=args.batch_real, seed=args.seed, channels_last=True)
        host.start()  # plugin setup is a one-off, not per iteration
        timer = StageTimer(device)
        time_methods(host, METHOD_STAGES["idm"], timer)
        return host.step, host.close, timer
    if variant.startswith("dance"):
        from adapters.dance import build_dance_host
        host = build_dance_host(data, experts, syn_init, plugins=plugins, factor=args.factor,
                                augment=not args.no_dsa, device=device,
                                num_iterations=args.warmup + args.repeats,
                                batch_real=args.batch_real, lr=0.01 * ipc, seed=args.seed,
                                channels_last=True)
        host.start()
        timer = StageTimer(device)
        time_methods(host, METHOD_STAGES["dance"], timer)
        return host.step, host.close, timer
    eager, unchunked = variant in NEVER_COMPILED, variant in ("host-nchw", "host-unchunked")
    host = build_dm_host(data, factory, syn_init, plugins=plugins,
                         iterations=args.warmup + args.repeats, batch_real=args.batch_real,
                         lr=1.0, momentum=0.5, factor=factor, seed=args.seed,
                         device=device, dsa=not args.no_dsa,
                         channels_last=variant != "host-nchw",
                         compile_real=args.compile and not eager,
                         compile_syn=args.compile and not eager,
                         real_chunk=1 << 40 if unchunked else None,
                         real_block=1 << 40 if unchunked else None,
                         syn_chunk=1 << 40 if unchunked else args.syn_chunk,
                         stage_timer=StageTimer(device))
    host._ensure_setup()  # plugin setup (PLM pseudo-labels) is a one-off, not per iteration
    return host.step, host.close, host.stage


def time_variants(variants, data, factory, experts, ipc, args, device):
    """Time all variants round-robin (iteration t of every variant, then t + 1, ...), so that
    drift in machine speed hits every variant alike. Returns one result dict per variant."""
    from baselines.harness.runs import peak_memory_mb, reset_peak_memory
    steppers = {v: make_stepper(v, data, factory, experts, ipc, args, device) for v in variants}
    times = {v: [] for v in variants}
    peaks = {v: 0.0 for v in variants}
    grown = {v: 0.0 for v in variants}
    for t in range(args.warmup + args.repeats):
        for v, (step, _, timer) in steppers.items():
            reset_peak_memory(device)
            sync(device)
            before = peak_memory_mb(device)  # right after a reset: the current memory
            if timer is not None and t == args.warmup:
                timer.reset()  # stages of the steady iterations only
            start = time.perf_counter()
            step(t)
            sync(device)
            times[v].append(time.perf_counter() - start)
            peak = peak_memory_mb(device)
            peaks[v] = max(peaks[v], peak)
            grown[v] = max(grown[v], peak - before)
    for _, close, _ in steppers.values():
        close()
    results = []
    for v in variants:
        steady = times[v][args.warmup:]
        timer = steppers[v][2]
        stages = ({k: s / args.repeats for k, s in timer.seconds.items()}
                  if timer is not None else None)
        method = v.split("+")[0]
        if stages is not None and method in TOP_STAGES:
            stages["rest"] = statistics.fmean(steady) - sum(stages.get(k, 0.0)
                                                            for k in TOP_STAGES[method])
        results.append({"variant": v, "ipc": ipc, "seconds_median": statistics.median(steady),
                        "seconds_min": min(steady), "seconds_all": steady,
                        "first_iteration_s": times[v][0],
                        "peak_memory_mb": peaks[v], "iteration_memory_mb": grown[v],
                        "stages": stages})
    return results


def eval_speed(epochs, data, factory, args, device):
    """Epochs per second of the evaluation protocol's training (DM protocol: SGD, batch 256,
    per-image DSA) on an IPC-10 factor-2 set decoded to 400 images, in the default memory
    format and channels-last, alternating (median over ``--repeats``)."""
    from baselines.harness.common import initial_synthetic
    from baselines.harness.dsa import DSA
    from baselines.harness.factorization import decode
    from dm_plugins.training import train_classifier
    stored = initial_synthetic(data, 10, 2, "real", args.seed)
    labels = torch.arange(data.num_classes).repeat_interleave(10)
    images, labels = decode(stored, labels, factor=2)
    dsa = DSA(flip=not data.is_digit_like)
    times = {False: [], True: []}
    for r in range(args.warmup + args.repeats):
        for channels_last in (False, True):
            torch.manual_seed(r)
            net = factory()
            start = time.perf_counter()
            train_classifier(net, images, labels, epochs=epochs, batch_size=256,
                             augment=dsa.per_image, generator=torch.Generator().manual_seed(r),
                             device=device, progress=False, channels_last=channels_last)
            sync(device)
            if r >= args.warmup:
                times[channels_last].append(time.perf_counter() - start)
    print(f"evaluation training on {images.shape[0]} images ({tuple(images.shape[1:])}), "
          f"{epochs} epochs, device {device}, threads {torch.get_num_threads()}:")
    for channels_last, ts in times.items():
        med = statistics.median(ts)
        print(f"  {'channels-last' if channels_last else 'default format'}: {epochs / med:.2f} "
              f"epochs/s ({med / epochs:.3f} s/epoch)")
    return times


def chunk_sweep(chunks, data, factory, args, device):
    """Median seconds of the no-graph real forward of ``batch_real`` images per class (DSA'd
    once, channels-last, one random extractor) at each chunk size, timed round-robin."""
    from dm_plugins import DMHost
    from dm_plugins.chunking import chunked_class_means
    from baselines.harness.dsa import DSA
    g = torch.Generator().manual_seed(0)
    syn = torch.cat([data.train.sample(c, 1, g) for c in range(data.num_classes)])
    host = DMHost(data.train, factory, syn, num_iterations=1, batch_real=args.batch_real,
                  seed=args.seed, device=device, channels_last=True,
                  augment=None if args.no_dsa else DSA(flip=not data.is_digit_like).siamese)
    net = host.prepare_extractor(0)
    real, labels = host.real_batch(0)
    with torch.no_grad():
        real = host._augment(real, labels, 0, host.classes)
        times = {c: [] for c in chunks}
        for t in range(args.warmup + args.repeats):
            for c in chunks:
                sync(device)
                start = time.perf_counter()
                chunked_class_means(net.embed, real, labels, data.num_classes, c)
                sync(device)
                if t >= args.warmup:
                    times[c].append(time.perf_counter() - start)
    print(f"real forward of {real.shape[0]} images ({tuple(real.shape[1:])}), device {device}, "
          f"threads {torch.get_num_threads()}, median of {args.repeats}:")
    print("| chunk | s | x one batch |\n|---:|---:|---:|")
    whole = statistics.median(times[max(chunks)])
    for c in chunks:
        med = statistics.median(times[c])
        print(f"| {c} | {med:.3f} | {med / whole:.2f} |")
    return {c: statistics.median(v) for c, v in times.items()}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.compare_contention is not None:
        _WORKERS.stop()
        return compare(os.path.abspath(__file__), strip_flag(argv, "--compare-contention"),
                       args.compare_contention)
    workers = _WORKERS if _WORKERS.count == args.contend else BusyWorkers(args.contend).start()
    try:
        if workers.pids:
            print(f"contention: {len(workers.pids)} busy single-threaded worker(s), pids "
                  f"{', '.join(map(str, workers.pids))}", flush=True)
        return measure(args)
    finally:
        workers.stop()
        _WORKERS.stop()


def measure(args) -> int:
    """The measurement :func:`main` runs (beside ``--contend`` busy workers when asked)."""
    apply_threads(args.threads)
    from baselines.harness.common import resolve_device
    from baselines.harness.networks import get_network
    from dm_plugins import ExpertPool

    device = resolve_device(args.device)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        print(f"error: unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}",
              file=sys.stderr)
        return 2
    ipcs = [int(v) for v in args.ipc.split(",")]
    data = load_data(args)

    def factory():
        extra = {} if args.width is None else {"width": args.width}
        return get_network(args.arch, data.channels, data.num_classes, data.image_size, **extra)

    if args.eval_speed:
        eval_speed(args.eval_speed, data, factory, args, device)
        return 0
    if args.chunk_sweep:
        chunk_sweep([int(c) for c in args.chunk_sweep.split(",")], data, factory, args, device)
        return 0
    experts = (ExpertPool.load(args.experts, factory, seed=args.seed) if args.experts
               else random_experts(factory, args.num_experts, args.seed))
    rows = []
    for ipc in ipcs:
        for res in time_variants(variants, data, factory, experts, ipc, args, device):
            rows.append(res)
            variant = res["variant"]
            print(f"  ipc {ipc:>3} {variant:<10} {res['seconds_median']:.3f} s/iter "
                  f"(min {res['seconds_min']:.3f}), peak {res['peak_memory_mb']:.0f} MiB, "
                  f"iteration {res['iteration_memory_mb']:.0f} MiB",
                  flush=True)
    for row in rows:
        base = {r["variant"]: r["seconds_median"] for r in rows if r["ipc"] == row["ipc"]}
        row["ratio_to_naive"] = row["seconds_median"] / base["naive"] if "naive" in base else None
        row["ratio_to_host"] = row["seconds_median"] / base["host"] if "host" in base else None

    print()
    print(f"dataset {data.name} ({data.num_classes} classes), batch_real {args.batch_real}, "
          f"factor {args.factor}, "
          f"DSA {'off' if args.no_dsa else 'on'}, device {device}, "
          f"{describe(torch.get_num_threads(), given=bool(args.threads))}, busy workers "
          f"{args.contend}, compile {args.compile}, median of {args.repeats} "
          f"after {args.warmup} warm-up")
    print("| IPC | variant | s/iter (median) | x naive | x host | peak memory (MiB) | "
          "iteration memory (MiB) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        fmt = lambda v: "-" if v is None else f"{v:.2f}"
        print(f"| {r['ipc']} | {r['variant']} | {r['seconds_median']:.3f} | "
              f"{fmt(r['ratio_to_naive'])} | {fmt(r['ratio_to_host'])} | "
              f"{r['peak_memory_mb']:.0f} | {r['iteration_memory_mb']:.0f} |")
    if args.compile:
        print("\nCompile time (first iteration minus the steady median; the warm-up iteration "
              "of each variant compiles):")
        for r in rows:
            if r["variant"] not in NEVER_COMPILED and not r["variant"].startswith(("idm", "dance")):
                print(f"  ipc {r['ipc']:>3} {r['variant']:<12} "
                      f"{r['first_iteration_s'] - r['seconds_median']:.1f} s")
    for method, names in (("dm", STAGES), ("idm", (*METHOD_STAGES["idm"], "rest")),
                          ("dance", (*METHOD_STAGES["dance"], "rest"))):
        staged = [r for r in rows if r["stages"] and
                  (r["variant"].split("+")[0] == method if method != "dm" else
                   not r["variant"].startswith(("idm", "dance")))]
        if not staged:
            continue
        print(f"\nStage breakdown ({method}), seconds per iteration (mean of the steady "
              f"iterations):")
        print("| IPC | variant | " + " | ".join(names) + " |")
        print("|---:|---|" + "---:|" * len(names))
        for r in staged:
            print(f"| {r['ipc']} | {r['variant']} | "
                  + " | ".join(f"{r['stages'].get(k, 0.0):.3f}" for k in names) + " |")
    out = args.json or os.path.join("benchmarks", "results", f"iteration_cost-{device.type}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    from baselines.harness.runs import environment
    from baselines.harness.synset import atomic_write_json
    cpu = platform.processor() or platform.machine()
    atomic_write_json(out, {"settings": vars(args), "device": str(device), "cpu": cpu,
                            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                            "environment": environment(), "rows": rows})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
