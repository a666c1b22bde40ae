"""CUDA paths against the CPU result. Skipped without a GPU; a session that has one runs them
(``python -m pytest -q tests/test_gpu.py``).

Tolerances: one iteration's loss and gradient agree to rtol 1e-3 (cuDNN and CPU convolutions sum
in different orders; TF32 is switched off for these tests); short trainings agree in accuracy to
within the test set's granularity times a few samples, since rounding differences change SGD
trajectories slowly but surely.
"""
import pytest
import torch

from dm_plugins import DMHost, ExpertPool, PluginSet
from tests.conftest import group_scale_augment

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _exact_matmuls():
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _loss_and_grad(toy, factory, pool, spec, device):
    from dm_plugins import ClassIndexedTensors
    real = ClassIndexedTensors(toy.images.to(device), toy.labels.to(device), toy.num_classes)
    g = torch.Generator().manual_seed(1)
    syn = torch.cat([toy.sample(c, 2, g) for c in range(3)])
    plugins = PluginSet.from_names(spec, experts=pool)
    host = DMHost(real, factory, syn, num_iterations=10, plugins=plugins,
                  augment=group_scale_augment, batch_real=7, seed=5, device=device)
    loss, metrics = host.compute_loss(6)
    loss.backward()
    host.close()
    return loss.detach().cpu(), host.syn.grad.cpu(), metrics


@pytest.mark.parametrize("spec", ["none", "cap", "ptm", "plm", "cap,ptm,plm"])
def test_host_with_each_plugin_on_cuda_equals_cpu(toy, tiny_factory, pool, spec):
    loss, grad, metrics = _loss_and_grad(toy, tiny_factory, pool, spec, torch.device("cpu"))
    c_loss, c_grad, c_metrics = _loss_and_grad(toy, tiny_factory, pool, spec, CUDA)
    torch.testing.assert_close(c_loss, loss, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(c_grad, grad, rtol=1e-3, atol=1e-5)
    assert c_metrics["real_kept"] == metrics["real_kept"]


def test_expert_training_on_cuda_matches_cpu(toy, tiny_factory):
    kw = dict(num_experts=1, epochs=2, batch_size=12, lr=0.05, progress=False)
    cpu = ExpertPool.train(tiny_factory, toy.images, toy.labels, **kw)
    gpu = ExpertPool.train(tiny_factory, toy.images, toy.labels, device=CUDA, **kw)
    a, b = cpu.experts[0], gpu.experts[0]
    for name in a.init_state:                       # same seeded initialisation, bit for bit
        assert torch.equal(a.init_state[name], b.init_state[name]), name
    for name in a.trained_state:                    # 6 SGD steps: rounding only
        torch.testing.assert_close(b.trained_state[name], a.trained_state[name],
                                   rtol=1e-3, atol=1e-4)
    assert b.trained_state["features.0.weight"].device.type == "cpu"   # stored on the CPU


def test_evaluation_on_cuda_matches_cpu(toy):
    from baselines.harness.evaluation import evaluate_synset
    from tests.conftest import TinyNet
    syn, labels = toy.images[::2], toy.labels[::2]
    kw = dict(runs=2, protocol="dm", epochs=3, seed=0, progress=False)
    cpu = evaluate_synset(syn, labels, toy.images, toy.labels, TinyNet, **kw)
    gpu = evaluate_synset(syn, labels, toy.images, toy.labels, TinyNet, device="cuda", **kw)
    # 36 test images: one image is 2.8 points; allow two flips per run
    for a, b in zip(cpu["accuracies"], gpu["accuracies"]):
        assert abs(a - b) <= 2 * 100 / 36 + 1e-9
