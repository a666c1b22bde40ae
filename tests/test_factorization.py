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


# ---------------------------------------------------------------------------- layout pins
# Cell j of a stored image sits at mosaic row j // f, column j % f (row-major; module docstring
# of baselines/harness/factorization.py). Note: IDM's own decoder uses column-major order
# (docs/methods.md#idm-and-dance); this harness does not.

def distinct_constants(n, c=2, h=12, w=12):
    """Image i is the constant (i + 1) in channel 0 and -(i + 1) in channel 1."""
    vals = torch.arange(1, n + 1, dtype=torch.float32).view(n, 1, 1, 1)
    return torch.cat([vals, -vals], 1)[:, :c].expand(n, c, h, w).clone()


def test_mosaic_init_factor2_quadrants_row_major():
    stored = mosaic_init(distinct_constants(4), 2)[0, 0]
    assert torch.equal(stored[:6, :6], torch.full((6, 6), 1.0))    # image 0: top-left
    assert torch.equal(stored[:6, 6:], torch.full((6, 6), 2.0))    # image 1: top-right
    assert torch.equal(stored[6:, :6], torch.full((6, 6), 3.0))    # image 2: bottom-left
    assert torch.equal(stored[6:, 6:], torch.full((6, 6), 4.0))    # image 3: bottom-right


def test_mosaic_init_factor3_nine_cells_uneven_edges():
    # 32 px, f = 3: edges 0, 11, 21, 32 (heights 11, 10, 11); 20 px columns: 0, 7, 13, 20
    real = distinct_constants(18, h=32, w=20)
    stored = mosaic_init(real, 3)
    expected = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=torch.float32)
    expected = torch.stack([expected, expected + 9])      # second stored image: images 9..17
    rows, cols = [0, 11, 21, 32], [0, 7, 13, 20]
    grid = expected.repeat_interleave(torch.tensor([11, 10, 11]), 1)
    grid = grid.repeat_interleave(torch.tensor([7, 6, 7]), 2)
    # (resizing a constant by a non-integer factor rounds in the last bit)
    assert torch.allclose(stored[:, 0], grid, atol=1e-5)
    assert torch.allclose(stored[:, 1], -grid, atol=1e-5)
    assert rows == cell_edges(32, 3) and cols == cell_edges(20, 3)


def test_mosaic_init_resizes_bilinear_align_corners_false():
    real = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    stored = mosaic_init(real, 2)
    ref = torch.nn.functional.interpolate(real, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(stored[0, :, :8, 8:], ref[1], atol=1e-6)
    assert torch.allclose(stored[0, :, 8:, :8], ref[2], atol=1e-6)
    # golden: halving a ramp 0..15 (align_corners=False, no antialias) samples at 2o + 0.5
    ramp = torch.arange(16.0).expand(4, 1, 16, 16)
    got = mosaic_init(ramp, 2)[0, 0, 0, :8]
    assert torch.allclose(got, torch.arange(8.0) * 2 + 0.5)


def test_decode_order_from_distinct_cells():
    stored = torch.zeros(2, 1, 9, 9)
    for k in range(2):
        for j in range(9):
            r, c = divmod(j, 3)
            stored[k, 0, 3 * r:3 * r + 3, 3 * c:3 * c + 3] = 10 * k + j
    imgs, lab = decode(stored, torch.tensor([7, 2]), 3)
    for k in range(2):
        for j in range(9):
            assert torch.allclose(imgs[9 * k + j], torch.full((1, 9, 9), 10.0 * k + j)), (k, j)
    assert lab.tolist() == [7] * 9 + [2] * 9


@pytest.mark.parametrize("factor,h,w", [(2, 16, 16), (3, 32, 20)])
def test_decode_equals_hand_sliced_bilinear_upsampling(factor, h, w):
    stored = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(2))
    imgs, _ = decode(stored, torch.tensor([0, 1]), factor)
    rows, cols = cell_edges(h, factor), cell_edges(w, factor)
    for k in range(2):
        for j in range(factor * factor):
            r, c = divmod(j, factor)
            crop = stored[k:k + 1, :, rows[r]:rows[r + 1], cols[c]:cols[c + 1]]
            ref = torch.nn.functional.interpolate(crop, size=(h, w), mode="bilinear",
                                                  align_corners=False)
            assert torch.allclose(imgs[k * factor * factor + j], ref[0], atol=1e-6), (k, j)


def test_decode_upsampling_golden_ramp():
    # x2 bilinear, align_corners=False: output o samples source (o + 0.5) / 2 - 0.5, clamped
    # to [0, n - 1]; on a ramp that is the value itself. (align_corners=True would give
    # o * 3 / 7 for a 4-pixel ramp.)
    stored = torch.zeros(1, 1, 8, 8)
    stored[0, 0, :4, :4] = torch.arange(4.0)           # top-left cell: ramp along columns
    stored[0, 0, :4, 4:] = torch.arange(4.0).view(4, 1)  # top-right cell: ramp along rows
    imgs, _ = decode(stored, torch.tensor([0]), 2)
    expected = (torch.arange(8.0) / 2 - 0.25).clamp(0, 3)
    assert torch.allclose(imgs[0, 0], expected.expand(8, 8))
    assert torch.allclose(imgs[1, 0], expected.view(8, 1).expand(8, 8))


def test_decode_soft_labels_repeat_contiguously():
    soft = torch.softmax(torch.rand(3, 4, generator=torch.Generator().manual_seed(3)), 1)
    _, rep = decode(torch.rand(3, 1, 8, 8), soft, 2)
    assert torch.equal(rep, torch.stack([soft[i] for i in range(3) for _ in range(4)]))


@pytest.mark.parametrize("factor,h", [(2, 16), (3, 32)])
def test_gradient_reaches_exactly_its_cell(factor, h):
    rows = cell_edges(h, factor)
    for k in range(2):
        for j in range(factor * factor):
            stored = torch.rand(2, 2, h, h, requires_grad=True)
            imgs, _ = decode(stored, torch.tensor([0, 1]), factor)
            imgs[k * factor * factor + j].sum().backward()
            r, c = divmod(j, factor)
            cell = torch.zeros(2, 2, h, h, dtype=torch.bool)
            cell[k, :, rows[r]:rows[r + 1], rows[c]:rows[c + 1]] = True
            g = stored.grad
            assert (g[cell] > 0).all(), (k, j)
            assert (g[~cell] == 0).all(), (k, j)
            # upsampling a cell of area A to h x h spreads total weight h*h over A pixels
            assert g[cell].sum() == pytest.approx(2 * h * h, rel=1e-5)
