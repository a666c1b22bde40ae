"""``torchrun --nproc-per-node 2 baselines/dm.py`` (gloo, CPU) on the embedded digits against one
process with the same seed: the gathered synthetic set class by class, the summed losses, the
evaluation runs dealt over the two ranks, and a 2-process run stopped after its checkpoint and
resumed. Each launch costs a few seconds of process start-up, so the cases share launches."""
import json
import signal
import time
import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from baselines import dance, dm, idm
from baselines.harness.datasets import load_dataset
from baselines.harness.dsa import DSA
from baselines.harness.evaluation import evaluate_synset
from baselines.harness.synset import load_synset

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--ipc", "2", "--iterations", "3", "--batch-real", "8", "--eval-runs", "0",
        "--num-experts", "2", "--expert-epochs", "1", "--checkpoint-every", "2",
        "--log-every", "1", "--no-progress", "--device", "cpu"]
ATOL = 1e-5  # pixels in [0, 1]; the ranks' real forwards batch fewer images than one process's


@pytest.fixture(autouse=True)
def _cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DM_PLUGINS_EXPERTS", str(tmp_path / "experts"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, stop_at=None, script="tests/dist_worker.py", method="dm",
             random_experts=True, exit_log=None):
    """Launch 2 ranks of ``script`` (gloo on CPU); the completed process. The worker script
    runs ``baselines/<method>.py``, uses the random stand-in experts (as the in-process runs
    here) unless ``random_experts`` is False, stops at ``stop_at`` and, given ``exit_log`` (a
    folder), writes there when each rank left ``main``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "DM_TEST_METHOD": method}
    for name in ("DM_TEST_STOP_AT", "DM_TEST_RANDOM_EXPERTS", "DM_TEST_EXIT_LOG"):
        env.pop(name, None)
    if exit_log is not None:
        env["DM_TEST_EXIT_LOG"] = str(exit_log)
    if random_experts:
        env["DM_TEST_RANDOM_EXPERTS"] = "1"
    if stop_at is not None:
        env["DM_TEST_STOP_AT"] = str(stop_at)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), script, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _per_class(path, num_classes=10):
    images = load_synset(path).images
    return images.view(num_classes, -1, *images.shape[1:])


def _assert_same_sets(one, two):
    a, b = _per_class(one / "synthetic.pt"), _per_class(two / "synthetic.pt")
    for c in range(a.shape[0]):
        torch.testing.assert_close(b[c], a[c], rtol=0, atol=ATOL, msg=f"class {c}")
    assert torch.equal(load_synset(one / "synthetic.pt").labels,
                       load_synset(two / "synthetic.pt").labels)


@contextmanager
def _one_thread():
    """One torch thread, as each rank runs (so serial and sharded runs compute alike)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_equal_one_and_split_the_evaluation(tmp_path):
    """``--nproc-per-node 2`` (our launcher, which starts the workers itself) against one
    process: the same set, global sums in the log, the evaluation runs dealt over the ranks."""
    args = TINY + ["--plugins", "none", "--eval-runs", "3", "--eval-epochs", "2"]
    assert dm.main(args + ["--out", str(tmp_path / "one")]) == 0
    launched = _our_launcher(args, tmp_path / "two")
    _, err = launched.communicate(timeout=300)
    assert launched.returncode == 0, err[-3000:]
    one, two = tmp_path / "one", tmp_path / "two"
    _assert_same_sets(one, two)
    names = {p.name for p in two.iterdir()}
    assert {"config.json", "synthetic.pt", "grid.png", "metrics.jsonl", "results.json",
            "run.log", "curves.png", "checkpoint-rank0.pt", "checkpoint-rank1.pt"} <= names
    assert "checkpoint.pt" not in names
    assert json.loads((two / "config.json").read_text())["world_size"] == 2
    for a, b in zip(_metrics(one), _metrics(two), strict=True):   # rank 0 logs global sums
        assert a["iteration"] == b["iteration"] and len(b["peak_memory_mb_per_rank"]) == 2
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert "2 processes, classes sharded" in (two / "run.log").read_text()
    # evaluation: 3 runs dealt over 2 ranks, gathered; equal to serial runs of the same file
    results = json.loads((two / "results.json").read_text())
    synset = load_synset(two / "synthetic.pt")
    digits = load_dataset("digits")
    with _one_thread():  # as the ranks ran
        serial = evaluate_synset(digits.normalize(synset.images), synset.labels,
                                 digits.test.images, digits.test.labels, "convnet", runs=3,
                                 epochs=2, seed=0, augment=DSA(flip=False), progress=False,
                                 num_classes=10, channels_last=True)
    assert results["accuracies"] == serial["accuracies"]
    assert results["accuracy_mean"] == serial["accuracy_mean"]


def test_two_processes_with_plugins_stop_resume_and_equal_one(tmp_path, capsys,
                                                              random_experts):
    args = TINY + ["--plugins", "cap,ptm,plm"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert dm.main(args + ["--out", str(one)]) == 0
    stopped = torchrun(args + ["--out", str(two)], stop_at=2)   # stops after checkpoint 2
    assert stopped.returncode != 0
    assert "--resume" in stopped.stderr and "torchrun --nproc-per-node 2" in stopped.stderr
    assert not (two / "synthetic.pt").exists()
    for rank in (0, 1):
        state = torch.load(two / f"checkpoint-rank{rank}.pt", weights_only=True)
        assert state["iteration"] == 2 and state["host"]["classes"] == [5 * rank, 5 * rank + 5]
    # another number of processes is refused before any work
    assert dm.main(["--resume", str(two), "--no-progress"]) == 2
    assert "distilled by 2 process(es)" in capsys.readouterr().err
    resumed = torchrun(["--resume", str(two), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_sets(one, two)
    assert "resumed at iteration 2 of 3" in (two / "run.log").read_text()
    assert [m["iteration"] for m in _metrics(two)] == [0, 1, 2]
    for a, b in zip(_metrics(one), _metrics(two), strict=True):
        assert b["loss_plm"] == pytest.approx(a["loss_plm"], rel=1e-5)
        assert b["real_kept"] == pytest.approx(a["real_kept"])


def _assert_same_pools(one, two, num_experts=2):
    for k in range(num_experts):
        a, b = (torch.load(d / f"expert_{k}.pt", weights_only=True) for d in (one, two))
        for which in ("init", "trained"):
            assert a[which].keys() == b[which].keys()
            for name in a[which]:
                torch.testing.assert_close(b[which][name], a[which][name], rtol=0, atol=0,
                                           msg=f"expert {k} {which} {name}")
    assert (json.loads((two / "manifest.json").read_text())["num_experts"] == num_experts)


def test_dance_two_processes_train_the_expert_pool_and_equal_one(tmp_path):
    """DANCE over 2 ranks with cap and ptm (DANCE's own CE step stays), the 2 ranks training
    the 2 experts (one each) into an empty cache: the pool equals the one-process run's pool
    and the gathered set its set, class by class. (plm on sharded hosts: the DM and IDM tests
    here.)"""
    pools = {n: tmp_path / f"pool-{n}" for n in ("one", "two")}
    runs = {n: tmp_path / f"run-{n}" for n in ("one", "two")}
    args = TINY + ["--plugins", "cap,ptm"]
    with _one_thread():
        assert dance.main(args + ["--experts", str(pools["one"]), "--out", str(runs["one"])]) == 0
    done = torchrun(args + ["--experts", str(pools["two"]), "--out", str(runs["two"])],
                    method="dance", random_experts=False)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_pools(pools["one"], pools["two"])
    assert "expert 1 trained by process 1" in (runs["two"] / "run.log").read_text()
    _assert_same_sets(runs["one"], runs["two"])
    for a, b in zip(_metrics(runs["one"]), _metrics(runs["two"]), strict=True):
        assert b["loss_ce"] == pytest.approx(a["loss_ce"], rel=1e-5)
        assert b["real_kept"] == pytest.approx(a["real_kept"])
        assert (b["mix"], b["expert"]) == (a["mix"], a["expert"])


def test_idm_two_processes_with_plugins_equal_one(tmp_path, random_experts):
    """IDM over 2 ranks with every plugin: each rank trains the whole model queue itself, the
    matching is split by class; the gathered set and the logged sums equal one process's.
    Rank 1 leaves only after rank 0 wrote the run's last file (the ranks tear the process
    group down together)."""
    args = TINY + ["--plugins", "cap,ptm,plm", "--model-train-steps", "1", "--trained-bs", "16"]
    one, two = tmp_path / "one", tmp_path / "two"
    with _one_thread():
        assert idm.main(args + ["--out", str(one)]) == 0
    done = torchrun(args + ["--out", str(two)], method="idm", exit_log=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    last_write = max(p.stat().st_mtime_ns for p in two.iterdir())
    assert int((tmp_path / "exit-rank1").read_text()) >= last_write
    _assert_same_sets(one, two)
    for a, b in zip(_metrics(one), _metrics(two), strict=True):
        for key in ("loss", "loss_match", "loss_ce", "loss_plm", "ce_scale", "trained_accuracy"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
        assert b["real_kept"] == pytest.approx(a["real_kept"])


def _our_launcher(args, out, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    return subprocess.Popen([sys.executable, str(ROOT / "baselines" / "dm.py"), *args,
                             "--nproc-per-node", "2", "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_nproc_per_node_answers_a_refusal_once_before_any_worker(tmp_path):
    """(The launcher's successful run is test_two_processes_equal_one_and_split_the_evaluation.)"""
    args = ["--ipc", "1", "--iterations", "3", "--batch-real", "8", "--eval-runs", "0",
            "--no-progress", "--device", "cpu"]
    bad = _our_launcher(args + ["--lr-img", "-1"], tmp_path / "bad")
    out, err = bad.communicate(timeout=300)
    assert bad.returncode == 2 and err.strip().splitlines() == ["error: --lr-img must be > 0, "
                                                                "got -1.0"]
    assert not (tmp_path / "bad").exists()


def test_sigterm_to_the_launcher_stops_every_worker_once_with_143(tmp_path):
    args = ["--ipc", "1", "--iterations", "400", "--batch-real", "8", "--eval-runs", "0",
            "--checkpoint-every", "1", "--no-progress", "--device", "cpu"]
    run = _our_launcher(args, tmp_path / "run")
    deadline = time.time() + 240
    while not (tmp_path / "run" / "checkpoint-rank1.pt").exists() and time.time() < deadline:
        time.sleep(0.5)
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 143, err
    assert "interrupted (SIGTERM)" in err
    assert f"python baselines/dm.py --nproc-per-node 2 --resume {tmp_path / 'run'}" in err
    assert "Traceback" not in err
