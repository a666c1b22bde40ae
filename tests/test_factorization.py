import pytest
import torch

from baselines.harness.factorization import cell_edges, decode, mosaic_init


def constant_images(n, c=3, h=32, w=32):
    colours = torch.rand(n, c, 1, 1, generator=torch.Generator().manual_seed(0))
    return colours.expand(n, c, h, w).clone()


@pytest.mark.parametrize("factor,h", [(2, 32), (3, 32), (2, 28), (4, 8)])
def test_shapes_and_label_repeat(factor, h):
    stored = torch.rand(5, 3, h, h)
    labels = torch.tensor([0, 1, 2, 1, 0])
    imgs, lab = decode(stored, labels, factor)
    assert imgs.shape == (5 * factor ** 2, 3, h, h)
    assert lab.tolist() == [l for l in labels.tolist() for _ in range(factor ** 2)]
    soft = torch.softmax(torch.rand(5, 3), 1)
    _, soft_rep = decode(stored, soft, factor)
    assert soft_rep.shape == (5 * factor ** 2, 3) and torch.equal(soft_rep[factor ** 2], soft[1])


def test_cell_edges():
    assert cell_edges(32, 2) == [0, 16, 32]
    assert cell_edges(32, 3) == [0, 11, 21, 32]
    assert cell_edges(32, 1) == [0, 32]


@pytest.mark.parametrize("factor,h,w", [(2, 32, 32), (3, 32, 32), (2, 28, 28), (3, 16, 20)])
def test_mosaic_roundtrip_constant_colours(factor, h, w):
    real = constant_images(2 * factor ** 2, h=h, w=w)
    stored = mosaic_init(real, factor)
    assert stored.shape == (2, 3, h, w)
    rows = cell_edges(h, factor)
    # cell j (row-major) of stored image k holds image k*f*f + j
    j = factor + 1 if factor > 1 else 0
    r, c = j // factor, j % factor
    cell = stored[1, :, rows[r]:rows[r + 1], cell_edges(w, factor)[c]:cell_edges(w, factor)[c + 1]]
    assert torch.allclose(cell, real[factor ** 2 + j, :, :cell.shape[1], :cell.shape[2]])
    decoded, lab = decode(stored, torch.tensor([3, 4]), factor)
    assert torch.allclose(decoded, real, atol=1e-6)
    assert lab.tolist() == [3] * factor ** 2 + [4] * factor ** 2


def test_gradient_flows_to_stored():
    stored = torch.rand(2, 3, 32, 32, requires_grad=True)
    imgs, _ = decode(stored, torch.tensor([0, 1]), 3)
    imgs[4].sum().backward()  # crop 4 (middle) of stored image 0
    g = stored.grad
    assert g[1].abs().sum() == 0
    assert g[0, :, 11:21, 11:21].abs().min() > 0
    assert g[0, :, :5, :5].abs().sum() == 0


def test_factor_one_identity():
    x = torch.rand(4, 3, 8, 8)
    y = torch.arange(4)
    imgs, lab = decode(x, y, 1)
    assert imgs is x and lab is y
    assert mosaic_init(x, 1) is x


def test_mosaic_requires_multiple():
    with pytest.raises(ValueError):
        mosaic_init(torch.rand(5, 3, 8, 8), 2)
