"""Class sharding without processes: the shard arithmetic, the real-data view that replays the
draws of classes it does not hold, the DSA's per-id draws, sharded DM hosts run one after
another against one host holding every class, split evaluation, and the refusals the driver
makes before any work (dm_plugins/distributed.py, tests/test_distributed_cli.py runs torchrun)."""
import json

import pytest
import torch

from baselines import dm
from baselines.harness.dsa import DSA
from baselines.harness.evaluation import evaluate_synset, resolve_protocol, summarize_accuracies
from dm_plugins import DMHost, PluginSet
from dm_plugins.distributed import (ClassShard, ShardedClassData, World, all_gather_object,
                                    all_gather_rows, any_rank, barrier, class_range)
from tests.conftest import TinyNet, make_toy

TINY = ["--ipc", "1", "--iterations", "2", "--batch-real", "8", "--eval-runs", "0",
        "--no-progress", "--device", "cpu"]


def test_class_range_is_contiguous_and_covers_every_class_once():
    assert [class_range(10, r, 3) for r in range(3)] == [range(0, 4), range(4, 7), range(7, 10)]
    assert [class_range(4, r, 4) for r in range(4)] == [range(r, r + 1) for r in range(4)]
    for c, k in ((7, 1), (10, 2), (100, 7), (5, 5)):
        ranges = [class_range(c, r, k) for r in range(k)]
        assert [x for rng in ranges for x in rng] == list(range(c))
        assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    with pytest.raises(ValueError, match="at least one class"):
        class_range(3, 0, 4)
    with pytest.raises(ValueError, match="outside"):
        ClassShard(10, 2, 2)
    assert ClassShard(10, 1, 2).classes == range(5, 10)


def test_collectives_are_the_identity_without_a_process_group():
    x = torch.arange(6.).view(3, 2)
    assert all_gather_rows(x) is x
    assert all_gather_object({"a": 1}) == [{"a": 1}]
    assert any_rank(True, False) == [True, False]
    assert barrier() is None
    assert ClassShard(4, 0, 2).sum([1, 2.5]) == [1.0, 2.5]
    assert not World().distributed and World(1, 2).distributed and not World(1, 2).is_main


def test_sharded_data_replays_the_draws_of_the_classes_it_does_not_hold():
    full = make_toy(num_classes=4, per_class=9)
    view = ShardedClassData.restrict(full, [1, 2])
    assert view.num_classes == 4 and view.class_sizes() == full.class_sizes()
    assert len(view) == 18 and view.held_classes == [1, 2]
    g_full, g_view = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(2):
        for c in range(4):
            a, b = full.sample(c, 4, g_full), view.sample(c, 4, g_view)
            if c in (1, 2):
                assert torch.equal(a, b)
            else:
                assert b.shape == (0, *full.image_shape)
    assert torch.equal(view.images_of(2), full.images_of(2))
    with pytest.raises(ValueError, match="not held"):
        view.images_of(0)
    assert torch.equal(view.to("cpu").images_of(1), full.images_of(1))


def test_dsa_with_num_groups_gives_each_group_the_draw_of_its_id():
    dsa = DSA(flip=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 1, 8, 8, generator=g)
    groups = torch.arange(4).repeat_interleave(3)
    for mode in ("siamese", "sequence"):
        for seed in range(6):  # several seeds: several ops get chosen
            full = getattr(dsa, mode)(x, groups, torch.Generator().manual_seed(seed))
            same = getattr(dsa, mode)(x, groups, torch.Generator().manual_seed(seed),
                                      num_groups=4)
            torch.testing.assert_close(same, full, rtol=0, atol=1e-6)
            part = groups >= 2                              # a process holding groups 2 and 3
            mine = getattr(dsa, mode)(x[part], groups[part], torch.Generator().manual_seed(seed),
                                      num_groups=4)
            torch.testing.assert_close(mine, full[part], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="0..3"):
        dsa.siamese(x, groups + 1, g, num_groups=4)


def _sharded_runs_equal_one(make, num_classes, ipc, check_metrics=("loss",)):
    """``make(shard)`` hosts: one holding every class against K=2 shards run one after
    another (no process group: each logs its own classes' sums). The shards' images, in class
    order, equal the single host's; their logged sums add up to its; their states name their
    classes and refuse another shard's."""
    single, logged = make(None), []
    single.run(callback=lambda t, m: logged.append(m), progress=False)
    parts, shard_logs = [], []
    for rank in range(2):
        shard = ClassShard(num_classes, rank, 2)
        h, seen = make(shard), []
        h.run(callback=lambda t, m: seen.append(m), progress=False)
        assert torch.equal(h.syn_labels.cpu(),
                           torch.tensor(list(shard.classes)).repeat_interleave(ipc))
        assert h.state_dict()["classes"] == [shard.classes.start, shard.classes.stop]
        parts.append(h.syn.detach())
        shard_logs.append(seen)
    torch.testing.assert_close(torch.cat(parts), single.syn.detach(), rtol=0, atol=1e-6)
    for key in check_metrics:
        torch.testing.assert_close(
            torch.tensor([[m[key] for m in log] for log in shard_logs]).sum(0),
            torch.tensor([m[key] for m in logged]), rtol=1e-5, atol=1e-6, msg=key)
    with pytest.raises(ValueError, match="classes"):
        make(ClassShard(num_classes, 0, 2)).load_state_dict(
            make(ClassShard(num_classes, 1, 2)).state_dict())
    with pytest.raises(ValueError, match="classes"):
        make(ClassShard(num_classes, 0, 2)).load_state_dict(single.state_dict())


@pytest.mark.parametrize("spec", ["none", "cap,ptm,plm"])
def test_sharded_hosts_together_equal_one_host(spec, toy, tiny_factory, pool):
    ipc = 2
    g = torch.Generator().manual_seed(1)
    syn = torch.cat([toy.sample(c, ipc, g) for c in range(toy.num_classes)])

    def host(shard=None):
        mine = syn if shard is None else syn[shard.classes.start * ipc:shard.classes.stop * ipc]
        real = toy if shard is None else ShardedClassData.restrict(toy, shard.classes)
        return DMHost(real, tiny_factory, mine, num_iterations=4, batch_real=5, seed=3,
                      plugins=PluginSet.from_names(spec, experts=pool),
                      augment=DSA(flip=False).siamese, shard=shard)
    _sharded_runs_equal_one(host, toy.num_classes, ipc)             # ranks: [0, 1] and [2]


def test_a_shard_must_split_the_real_datas_classes(toy, tiny_factory):
    with pytest.raises(ValueError, match="splits 4 classes"):
        DMHost(toy, tiny_factory, toy.images[:2], num_iterations=1, shard=ClassShard(4, 0, 2))


def test_evaluation_runs_split_over_processes_give_the_serial_accuracies():
    data = make_toy(num_classes=3, per_class=6)
    kwargs = dict(runs=3, epochs=2, seed=4, augment=DSA(flip=False), progress=False)
    factory = lambda: TinyNet(1, 3, 4, 8)  # noqa: E731
    serial = evaluate_synset(data.images, data.labels, data.images, data.labels, factory,
                             **kwargs)
    parts = [evaluate_synset(data.images, data.labels, data.images, data.labels, factory,
                             run_indices=idx, **kwargs) for idx in ([0, 2], [1])]
    assert parts[0]["run_indices"] == [0, 2]
    merged = [parts[0]["accuracies"][0], parts[1]["accuracies"][0], parts[0]["accuracies"][1]]
    assert summarize_accuracies(merged, resolve_protocol("dm", 2), 3) == serial


def _one_line_error(capsys, code, *fragments):
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def test_methods_that_do_not_shard_refuse_several_processes(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    from dataclasses import replace

    from baselines.harness import driver
    unsharded = replace(dm.SPEC, name="mine", shards_classes=False)   # e.g. a third party's
    _one_line_error(capsys, driver.main(unsharded, TINY + ["--out", str(tmp_path / "r")]),
                    "baselines/mine.py", "one process", "WORLD_SIZE=2")
    assert not (tmp_path / "r").exists()
    monkeypatch.setenv("WORLD_SIZE", "two")
    _one_line_error(capsys, dm.main(TINY + ["--out", str(tmp_path / "r")]), "WORLD_SIZE")
    assert not (tmp_path / "r").exists()


def test_resume_needs_the_same_number_of_processes(capsys, tmp_path):
    out = tmp_path / "r"
    assert dm.main(TINY + ["--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 1
    config["world_size"] = 2
    (out / "config.json").write_text(json.dumps(config))
    _one_line_error(capsys, dm.main(["--resume", str(out), "--no-progress"]),
                    "distilled by 2 process(es)",
                    f"python baselines/dm.py --nproc-per-node 2 --resume {out}, or torchrun")


def test_more_processes_than_classes_or_a_batchnorm_network_is_refused(toy):
    from baselines.harness.common import UsageError
    from baselines.harness.datasets import load_dataset
    from baselines.harness.opening import check_processes as _check_processes
    digits = load_dataset("digits")
    _check_processes(World(0, 10), digits, "convnet")
    _check_processes(World(0, 1), digits, "resnet10")               # one process: anything
    with pytest.raises(UsageError, match="11 processes for 10 classes"):
        _check_processes(World(0, 11), digits, "convnet")
    with pytest.raises(UsageError, match="BatchNorm"):
        _check_processes(World(0, 2), digits, "resnet10")
    bn = lambda: torch.nn.Sequential(torch.nn.BatchNorm2d(1))  # noqa: E731
    with pytest.raises(ValueError, match="BatchNorm"):
        DMHost(toy, bn, toy.images[:4], num_iterations=1, shard=ClassShard(3, 0, 2))


def test_each_process_keeps_its_previous_checkpoint_and_resume_takes_the_latest_shared(
        tmp_path, monkeypatch):
    from baselines.harness.building import common_checkpoint
    from baselines.harness.runs import RunDir, RunError
    from dm_plugins import distributed
    run = RunDir(tmp_path, rank=1, world_size=2)
    assert run.checkpoint_path.name == "checkpoint-rank1.pt"
    for it in (2, 4, 6):
        run.save_checkpoint({"host": {}, "iteration": it})
    assert sorted(run.load_checkpoints()) == [4, 6]
    assert run.previous_checkpoint_path.name == "checkpoint-rank1.prev.pt"
    assert RunDir(tmp_path).checkpoint_path.name == "checkpoint.pt"     # one process: as before
    states = run.load_checkpoints()
    # rank 0 was killed after writing iteration 6 and before rank 1 ... and the other way round
    monkeypatch.setattr(distributed, "all_gather_object", lambda mine: [[2, 4], mine])
    assert common_checkpoint(states, World(1, 2), run)["iteration"] == 4
    monkeypatch.setattr(distributed, "all_gather_object", lambda mine: [[], []])
    assert common_checkpoint({}, World(1, 2), run) is None
    monkeypatch.setattr(distributed, "all_gather_object", lambda mine: [[0, 2], mine])
    with pytest.raises(RunError, match="share no iteration"):
        common_checkpoint(states, World(1, 2), run)


@pytest.mark.parametrize("spec", ["none", "cap,ptm,plm"])
def test_sharded_dance_hosts_together_equal_one_host(spec, toy, pool):
    from functools import partial

    from adapters.dance import DANCEHost
    from baselines.harness.factorization import decode
    from tests.conftest import group_scale_augment
    from tests.test_dance import normalize, pixel_init
    stored = pixel_init(toy)                                  # ipc 1, factor 2, 3 classes

    def make(shard):
        mine = stored if shard is None else stored[shard.classes.start:shard.classes.stop]
        real = toy if shard is None else ShardedClassData.restrict(toy, shard.classes)
        return DANCEHost(real, pool, mine, plugins=PluginSet.from_names(spec, experts=pool),
                         normalize=normalize, num_iterations=4, augment=group_scale_augment,
                         decode=partial(decode, factor=2), batch_real=5, batch_syn_max=3,
                         lr=0.05, momentum=0.5, iter_calib=2, seed=0, shard=shard)
    _sharded_runs_equal_one(make, toy.num_classes, 1,
                            ("loss", "loss_match", "loss_plm" if "plm" in spec else "loss_ce"))


@pytest.mark.parametrize("spec", ["none", "cap,ptm,plm"])
def test_sharded_idm_hosts_together_equal_one_host(spec, toy, tiny_factory, pool):
    from functools import partial

    from adapters.idm import IDMHost
    from baselines.harness.factorization import decode, mosaic_init
    from tests.conftest import group_scale_augment
    g = torch.Generator().manual_seed(3)
    stored = torch.cat([mosaic_init(toy.sample(c, 4, g), 2) for c in range(toy.num_classes)])

    def make(shard):
        mine = stored if shard is None else stored[shard.classes.start:shard.classes.stop]
        return IDMHost(toy, tiny_factory, mine, plugins=PluginSet.from_names(spec, experts=pool),
                       num_iterations=4, augment=group_scale_augment,
                       decode=partial(decode, factor=2), batch_real=5, lr=0.2, momentum=0.5,
                       ce_weight=0.5, net_num=5, net_generate_interval=2, model_train_steps=2,
                       trained_bs=6, meter_interval=3, seed=0, shard=shard)
    _sharded_runs_equal_one(make, toy.num_classes, 1, ("loss", "loss_match", "loss_ce", "ce")
                            + (("loss_plm",) if "plm" in spec else ()))
    # the queue is replicated: every shard trains it as one process does
    hosts = [make(None), make(ClassShard(toy.num_classes, 1, 2))]
    for h in hosts:
        h.run(progress=False)
    for a, b in zip(hosts[0].queue, hosts[1].queue, strict=True):
        assert a.serial == b.serial and (a.correct, a.seen) == (b.correct, b.seen)
        for x, y in zip(a.net.state_dict().values(), b.net.state_dict().values()):
            assert torch.equal(x, y)


def test_a_sharded_idm_host_needs_every_class_of_the_real_data(toy, tiny_factory):
    from baselines.methods.idm import IDM
    shard = ClassShard(toy.num_classes, 0, 2)
    with pytest.raises(ValueError, match="every class's real images"):
        IDM(ShardedClassData.restrict(toy, shard.classes), tiny_factory, toy.images[:2],
            num_iterations=1, shard=shard)


def test_a_sharded_dance_host_refuses_a_class_without_inter_class_loss(toy, pool):
    from adapters.dance import DANCEHost
    from tests.test_dance import normalize, pixel_init

    class NoInterClass(DANCEHost):
        def inter_class_losses(self, syn_images, syn_labels, t, *offered):
            return {}
    shard = ClassShard(toy.num_classes, 1, 2)
    host = NoInterClass(ShardedClassData.restrict(toy, shard.classes), pool,
                        pixel_init(toy)[shard.classes.start:], normalize=normalize,
                        num_iterations=1, batch_real=4, shard=shard)
    with pytest.raises(ValueError, match="no inter-class loss"):
        host.step(0)


def test_spreading_expert_training_needs_a_process_group(tmp_path, toy, tiny_factory):
    from dm_plugins import ExpertPool
    from dm_plugins.errors import ExpertError
    with pytest.raises(ExpertError, match="process group of 2"):
        ExpertPool.load_or_train(tmp_path, tiny_factory, toy.images, toy.labels, num_experts=2,
                                 epochs=1, rank=1, world_size=2, progress=False)
    assert not any(tmp_path.iterdir())
