"""The driver's parts: the settings table is the one source of the parser, config.json, a
--config file's reading and the resume check; build_host gets one HostRequest; capabilities
are read from the spec; a run is phases with callbacks."""
import argparse
import json

import pytest

from baselines.harness import driver, phases
from baselines.harness.callbacks import (Callback, Checkpoint, MetricsRecord, NonFiniteGuard,
                                         StopOnSignal, default_callbacks)
from baselines.harness.command_line import build_parser, parse_args
from baselines.harness.datasets import load_dataset
from baselines.harness.resolve import check_resume_flags, required_keys, resolve_config
from baselines.harness.settings import BY_DEST, FREE, SETTINGS, from_config, to_config
from baselines.harness.spec import HostRequest
from dm_plugins import DMHost

RUN = ["--ipc", "1", "--no-progress", "--device", "cpu", "--iterations", "2",
       "--batch-real", "4", "--eval-runs", "0"]
SEEN = []


def _host(request):
    SEEN.append(request)
    config = request.config
    return DMHost(request.dataset.train, request.network_factory, request.syn_init,
                  num_iterations=config["iterations"], plugins=request.plugins,
                  batch_real=config["batch_real"], lr=config["lr_img"],
                  momentum=config["momentum"], seed=config["seed"], device=request.device)


def _legacy_host(dataset, network_factory, syn_init, plugins, config, device, channels_last):
    return _host(HostRequest(dataset, network_factory, syn_init, plugins, config, device,
                             channels_last))


DEFAULTS = {"iterations": 2, "plugins": "none", "factor": 1, "lr_img": 0.1, "momentum": 0.5,
            "batch_real": 4, "num_experts": 1, "expert_epochs": 1, "eval_runs": 0,
            "eval_epochs": 1}
TOY = driver.MethodSpec(name="toy", description="toy", defaults=DEFAULTS, build_host=_host,
                        embedded_budget={})


def test_every_row_of_the_table_is_a_flag_and_every_recorded_row_a_config_key():
    parser = build_parser(TOY)
    options = {o for a in parser._actions for o in a.option_strings}
    args, explicit = parse_args(TOY, RUN)
    config = resolve_config(TOY, args, load_dataset("digits"), explicit)
    for row in SETTINGS:
        if row.only_if is not None and not row.only_if(TOY):
            assert row.option not in options
            continue
        assert row.option in options
        assert (row.config_key in config) == row.record or row.dest == "preset"
        if row.record:
            assert config["sources"][row.config_key]
    assert "nproc_per_node" not in vars(args)  # the toy does not shard classes
    assert required_keys(TOY) >= {row.config_key for row in SETTINGS if row.record} - {
        "experts", "expert_seed", "expert_recipe", "eval_compile", "eval_at", "eval_every"}


@pytest.mark.parametrize("dest,parsed,recorded", [
    ("no_dsa", True, False), ("eval_arch", "convnet, resnet10", ["convnet", "resnet10"]),
    ("plugins", "cap,plm", ["cap", "plm"]), ("plugins", "none", []), ("ipc", 3, 3)])
def test_a_row_writes_config_json_and_reads_it_back(dest, parsed, recorded):
    written = to_config(dest, parsed, {"seed": 0})
    assert written == recorded
    back_dest, back = from_config(BY_DEST[dest].config_key, written)
    assert back_dest == dest
    assert to_config(dest, back, {"seed": 0}) == recorded


def test_the_resume_check_follows_each_rows_rule(tmp_path):
    recorded = {"ipc": 1, "dsa": True, "device": "cpu", "eval_arch": ["convnet"]}
    args = argparse.Namespace(ipc=1, no_dsa=False, device="auto", eval_arch="convnet",
                              no_progress=True, out="x", resume="r")
    check_resume_flags(args, {"ipc", "no_dsa", "device", "eval_arch", "no_progress", "resume"},
                       recorded, tmp_path)
    assert BY_DEST["no_progress"].on_resume == FREE
    with pytest.raises(Exception, match="--no-dsa"):
        check_resume_flags(argparse.Namespace(no_dsa=True), {"no_dsa"}, recorded, tmp_path)
    with pytest.raises(Exception, match="--out cannot be combined with --resume"):
        check_resume_flags(args, {"out"}, recorded, tmp_path)


def test_build_host_gets_one_request_and_the_old_signature_still_works(tmp_path):
    SEEN.clear()
    assert driver.main(TOY, RUN + ["--out", str(tmp_path / "new")]) == 0
    (request,) = SEEN
    assert isinstance(request, HostRequest)
    assert request.experts is None and request.shard is None
    assert request.syn_init.shape[0] == request.dataset.num_classes
    legacy = driver.MethodSpec(name="toy", description="toy", defaults=DEFAULTS,
                               build_host=_legacy_host, embedded_budget={})
    with pytest.warns(DeprecationWarning, match="HostRequest"):
        assert driver.main(legacy, RUN + ["--out", str(tmp_path / "old")]) == 0
    assert len(SEEN) == 2


def test_a_capability_the_spec_denies_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    from baselines import dance
    from baselines.harness import expert_cache

    def no_experts(*args, **kwargs):
        raise AssertionError("experts were loaded before --compile was refused")

    monkeypatch.setattr(expert_cache, "load_or_train_experts", no_experts)
    assert dance.main(RUN + ["--compile", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --compile is not supported by dance") and "\n" not in err
    assert not (tmp_path / "d").exists()
    assert dance.SPEC.stores_pixels and not dance.SPEC.supports_compile


def test_default_callbacks_run_in_order_and_a_run_takes_its_own(tmp_path):
    class Record(Callback):
        def __init__(self):
            self.ends = []

        def on_iteration_end(self, run, host, end):
            self.ends.append((end.t, end.done, end.stopping))

    args, explicit = parse_args(TOY, RUN + ["--out", str(tmp_path / "r")])
    record = Record()
    assert phases.run(TOY, args, explicit, callbacks=[record, Checkpoint()]) == 0
    assert record.ends == [(0, 1, False), (1, 2, False)]
    metrics = tmp_path / "r" / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text().strip()  # no MetricsRecord given
    assert json.loads((tmp_path / "r" / "config.json").read_text())["iterations"] == 2

    class Opened:
        progress = True  # bars, so no heartbeat lines
    kinds = [type(c) for c in default_callbacks(Opened(), start=0)]
    assert kinds == [NonFiniteGuard, MetricsRecord, Checkpoint, StopOnSignal]


def test_a_host_attribute_the_spec_does_not_declare_is_refused(tmp_path):
    class PixelHost(DMHost):
        stores_pixels = True  # the older way to say it, which the driver no longer reads

    def build(request):
        config = request.config
        return PixelHost(request.dataset.train, request.network_factory, request.syn_init,
                         num_iterations=config["iterations"], batch_real=config["batch_real"],
                         lr=config["lr_img"], momentum=config["momentum"],
                         device=request.device)

    spec = driver.MethodSpec(name="toy", description="toy", defaults=DEFAULTS,
                             build_host=build, embedded_budget={})
    with pytest.raises(TypeError, match="declare it on the MethodSpec"):
        driver.main(spec, RUN + ["--out", str(tmp_path / "p")])
