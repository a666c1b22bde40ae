"""DSA ops pinned against independent expectations (docs/methods.md#dsa).

Every op is checked twice: ``DSA.apply`` with explicit parameters against a hand-computed result
(torch.rot90, hand bilinear interpolation, hand slicing, hand colour formulas), and the random
modes against draws reproduced from an identically seeded generator.

Conventions the tests pin (images are (N, C, H, W), row 0 at the top, column 0 at the left):

* rotate: ``angle = +90 deg`` equals ``torch.rot90(x, k=1, dims=(2, 3))``, i.e. the content turns
  counter-clockwise as displayed (the top-right corner goes to the top-left). This follows from
  the affine matrix ``[[cos, -sin], [sin, cos]]`` acting on normalised output coordinates
  ``(x = column, y = row)`` to give the sampled input coordinates.
* scale: ``sx`` acts on columns (width), ``sy`` on rows (height); output pixel at normalised
  ``(x, y)`` samples the input at ``(sx * x, sy * y)``, so a factor below 1 stretches the content.
* crop: ``out[r, c] = x[r + tx, c + ty]`` (zero outside): ``tx = +k`` moves content up by k rows,
  ``ty = +k`` moves it left by k columns.
* cutout: rows ``x0 .. x0 + side - 1`` and columns ``y0 .. y0 + side_w - 1`` are zeroed, clipped.
* flip: reverses columns (width), never rows.
"""
import math

import numpy as np
import pytest
import torch

from baselines.harness.dsa import DSA


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def asym(n=2, c=2, h=7, w=7, dtype=torch.float64):
    """Images with no symmetry: distinct values everywhere."""
    return torch.arange(n * c * h * w, dtype=dtype).view(n, c, h, w) * 0.01 + 1.0


# ----------------------------------------------------------------------------- rotate

def _rotate(x, degrees):
    angle = torch.full((x.shape[0],), math.radians(degrees), dtype=torch.float64)
    return DSA().apply("rotate", x, {"angle": angle})


def test_rotate_plus_90_is_counter_clockwise_rot90():
    x = asym()
    out = _rotate(x, 90.0)
    # counter-clockwise as displayed: torch.rot90 with k=+1 on (rows, cols)
    assert torch.allclose(out, torch.rot90(x, 1, dims=(2, 3)), atol=1e-9)
    assert not torch.allclose(out, torch.rot90(x, -1, dims=(2, 3)), atol=1e-3)
    # landmark, without rot90: a single bright pixel at the top-right corner ends top-left
    dot = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    dot[0, 0, 0, 4] = 1.0
    moved = _rotate(dot, 90.0)[0, 0]
    assert moved[0, 0] == pytest.approx(1.0, abs=1e-9)
    assert moved.sum() == pytest.approx(1.0, abs=1e-9)


def test_rotate_minus_90_is_clockwise_rot90():
    x = asym()
    assert torch.allclose(_rotate(x, -90.0), torch.rot90(x, -1, dims=(2, 3)), atol=1e-9)
    dot = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    dot[0, 0, 0, 4] = 1.0  # top-right goes bottom-right under a clockwise quarter turn
    assert _rotate(dot, -90.0)[0, 0, 4, 4] == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("degrees", [12.0, -12.0, 3.5])
def test_rotate_small_angle_against_hand_sampling(degrees):
    # Bilinear sampling reproduces a linear image exactly, so every output pixel whose source
    # lies inside the image equals the linear function at the hand-rotated source coordinates.
    h = w = 9
    cen = (h - 1) / 2
    i, j = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                          torch.arange(w, dtype=torch.float64), indexing="ij")
    x = (0.3 * i + 0.7 * j + 1.0).view(1, 1, h, w)
    out = _rotate(x, degrees)[0, 0]
    a = math.radians(degrees)
    js = cen + math.cos(a) * (j - cen) - math.sin(a) * (i - cen)   # source column
    is_ = cen + math.sin(a) * (j - cen) + math.cos(a) * (i - cen)  # source row
    expected = 0.3 * is_ + 0.7 * js + 1.0
    inside = (is_ >= 0) & (is_ <= h - 1) & (js >= 0) & (js <= w - 1)
    assert inside.sum() > 40
    assert torch.allclose(out[inside], expected[inside], atol=1e-9)
    # pixels whose source is more than a pixel outside the image are zero fill
    far = (is_ < -1) | (is_ > h) | (js < -1) | (js > w)
    assert (out[far] == 0).all()


# ----------------------------------------------------------------------------- scale

def _scale(x, sx, sy):
    n = x.shape[0]
    return DSA().apply("scale", x, {"sx": torch.full((n,), sx, dtype=torch.float64),
                                    "sy": torch.full((n,), sy, dtype=torch.float64)})


def test_scale_sx_stretches_columns_sy_rows_bar_images():
    h = w = 9
    horizontal = torch.zeros(1, 1, h, w, dtype=torch.float64)
    horizontal[..., 3:6, :] = 1.0           # a horizontal bar (rows 3-5, full width)
    vertical = horizontal.transpose(2, 3).clone()   # a vertical bar (columns 3-5)
    # sx = 0.5: output column j samples input column 4 + (j - 4) / 2 -> the vertical bar widens
    widened = torch.tensor([0, 0.5, 1, 1, 1, 1, 1, 0.5, 0], dtype=torch.float64)
    assert torch.allclose(_scale(horizontal, 0.5, 1.0), horizontal, atol=1e-12)
    assert torch.allclose(_scale(vertical, 0.5, 1.0)[0, 0], widened.expand(h, w), atol=1e-12)
    # sy = 0.5: rows instead
    assert torch.allclose(_scale(vertical, 1.0, 0.5), vertical, atol=1e-12)
    assert torch.allclose(_scale(horizontal, 1.0, 0.5)[0, 0], widened.view(h, 1).expand(h, w),
                          atol=1e-12)


def _lerp_zero_pad(values, positions):
    """1-D linear interpolation at fractional pixel positions with zeros outside the image."""
    n = len(values)
    xp = np.arange(-1, n + 1, dtype=np.float64)
    fp = np.concatenate([[0.0], values, [0.0]])
    return np.interp(positions, xp, fp, left=0.0, right=0.0)


@pytest.mark.parametrize("sx,sy", [(0.6, 1.3), (1.15, 0.85), (1 / 1.2, 1.2)])
def test_scale_against_separable_hand_interpolation(sx, sy):
    # x[i, j] = a[i] * b[j]; bilinear sampling of a product is the product of the 1-D linear
    # interpolations, so out[i, j] = A(ci + (i - ci) * sy) * B(cj + (j - cj) * sx).
    h, w = 7, 10  # non-square, so an x/y mix-up cannot hide
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.5, 2.0, h), rng.uniform(0.5, 2.0, w)
    x = torch.from_numpy(np.outer(a, b)).view(1, 1, h, w)
    ci, cj = (h - 1) / 2, (w - 1) / 2
    rows = _lerp_zero_pad(a, ci + (np.arange(h) - ci) * sy)
    cols = _lerp_zero_pad(b, cj + (np.arange(w) - cj) * sx)
    expected = torch.from_numpy(np.outer(rows, cols))
    assert torch.allclose(_scale(x, sx, sy)[0, 0], expected, atol=1e-9)


def test_scale_and_rotate_draws_map_uniforms_as_documented():
    d = DSA()
    g, ref = gen(7), gen(7)
    p = d.draw_params("scale", 1000, 32, 32, g)
    lo, hi = 1 / 1.2, 1.2
    u1, u2 = torch.rand(1000, generator=ref), torch.rand(1000, generator=ref)
    assert torch.allclose(p["sx"], lo + u1 * (hi - lo)) and torch.allclose(p["sy"], lo + u2 * (hi - lo))
    p = d.draw_params("rotate", 1000, 32, 32, g)
    u = torch.rand(1000, generator=ref)
    assert torch.allclose(p["angle"], torch.deg2rad((u - 0.5) * 30.0), atol=1e-7)
    assert (p["angle"].abs() <= math.radians(15.0)).all()


# ----------------------------------------------------------------------------- crop

def test_crop_shift_direction_against_hand_indexing():
    h, w = 6, 7
    x = asym(n=5, c=2, h=h, w=w)
    tx = torch.tensor([2, -2, 0, 3, 7])      # rows
    ty = torch.tensor([0, 1, -3, -1, 0])     # columns
    out = DSA().apply("crop", x, {"tx": tx, "ty": ty})
    expected = torch.zeros_like(x)
    for n in range(5):
        for r in range(h):
            for c in range(w):
                rs, cs = r + int(tx[n]), c + int(ty[n])
                if 0 <= rs < h and 0 <= cs < w:
                    expected[n, :, r, c] = x[n, :, rs, cs]
    assert torch.equal(out, expected)
    # +2 rows: content moves up, the bottom two rows are zero fill
    assert torch.equal(out[0, :, :4], x[0, :, 2:]) and (out[0, :, 4:] == 0).all()
    # -2 rows: content moves down, the top two rows are zero fill
    assert torch.equal(out[1, :, 2:, :6], x[1, :, :4, 1:]) and (out[1, :, :2] == 0).all()
    # -3 columns: content moves right, the left three columns are zero fill
    assert torch.equal(out[2, :, :, 3:], x[2, :, :, :4]) and (out[2, :, :, :3] == 0).all()
    assert (out[4] == 0).all()  # shifted past the image


def test_crop_ranges_use_height_for_rows_and_width_for_columns():
    p = DSA().draw_params("crop", 4000, 32, 64, gen(1))
    # s = int(0.125 * size + 0.5): 4 for 32 rows, 8 for 64 columns; every value is reachable
    assert sorted(p["tx"].unique().tolist()) == list(range(-4, 5))
    assert sorted(p["ty"].unique().tolist()) == list(range(-8, 9))
    p = DSA().draw_params("crop", 4000, 20, 12, gen(2))
    assert sorted(p["tx"].unique().tolist()) == list(range(-3, 4))   # int(2.5 + 0.5) = 3
    assert sorted(p["ty"].unique().tolist()) == list(range(-2, 3))   # int(1.5 + 0.5) = 2


# ----------------------------------------------------------------------------- cutout

def _box(h, w, r0, c0, side_h, side_w):
    m = torch.zeros(h, w, dtype=torch.bool)
    m[max(r0, 0):max(r0 + side_h, 0), max(c0, 0):max(c0 + side_w, 0)] = True
    return m


def test_cutout_explicit_corner_zeroes_exact_clipped_box():
    h, w = 16, 24  # side 8 rows x 12 columns
    x = asym(n=3, c=2, h=h, w=w)
    x0, y0 = torch.tensor([3, -3, 10]), torch.tensor([5, 20, -11])
    out = DSA().apply("cutout", x, {"x0": x0, "y0": y0})
    for n in range(3):
        hole = _box(h, w, int(x0[n]), int(y0[n]), 8, 12)
        assert (out[n][:, hole] == 0).all()
        assert torch.equal(out[n][:, ~hole], x[n][:, ~hole])
    assert _box(h, w, 3, 5, 8, 12).sum() == 8 * 12


@pytest.mark.parametrize("h,w", [(16, 24), (14, 9)])
def test_cutout_per_image_square_at_reproduced_centre(h, w):
    side_h, side_w = int(0.5 * h + 0.5), int(0.5 * w + 0.5)   # (8, 12) and (7, 5)
    n = 64
    out = DSA("cutout").per_image(torch.ones(n, 1, h, w), gen(3))
    ref = gen(3)
    torch.randint(1, (1,), generator=ref)  # the op choice (one op)
    # centre uniform over [0, size] for an even side, [0, size - 1] for an odd one
    cx = torch.randint(0, h + (1 - side_h % 2), (n,), generator=ref)
    cy = torch.randint(0, w + (1 - side_w % 2), (n,), generator=ref)
    for k in range(n):
        hole = _box(h, w, int(cx[k]) - side_h // 2, int(cy[k]) - side_w // 2, side_h, side_w)
        assert torch.equal(out[k, 0] == 0, hole)


def test_cutout_centre_range():
    d = DSA()
    p = d.draw_params("cutout", 4000, 16, 14, gen(4))   # sides 8 and 7
    assert p["x0"].min() == 0 - 4 and p["x0"].max() == 16 - 4
    assert p["y0"].min() == 0 - 3 and p["y0"].max() == 13 - 3


# ----------------------------------------------------------------------------- flip

def test_flip_reverses_width_only():
    x = asym(n=3, h=5, w=6)
    out = DSA().apply("flip", x, {"flip": torch.tensor([True, False, True])})
    assert torch.equal(out[0], x[0, :, :, [5, 4, 3, 2, 1, 0]])
    assert torch.equal(out[1], x[1])
    assert torch.equal(out[2], x[2].flip(-1)) and not torch.equal(out[2], x[2].flip(-2))


def test_flip_probability_half():
    f = DSA().draw_params("flip", 4000, 8, 8, gen(5))["flip"]
    u = torch.rand(4000, generator=gen(5))
    assert torch.equal(f, u < 0.5)
    assert 0.45 < f.float().mean() < 0.55


# ----------------------------------------------------------------------------- colour

def _channel_mean(x):
    return sum(x[:, k:k + 1] for k in range(x.shape[1])) / x.shape[1]


def _image_mean(x):
    return x.sum(dim=(1, 2, 3), keepdim=True) / x[0].numel()


def test_colour_ops_with_explicit_parameters():
    x = torch.randn(2, 3, 5, 4, generator=gen(9), dtype=torch.float64)
    d = DSA()
    b = torch.tensor([0.3, -0.2], dtype=torch.float64)
    assert torch.allclose(d.apply("brightness", x, {"b": b}), x + b.view(2, 1, 1, 1))
    s = torch.tensor([0.3, 1.7], dtype=torch.float64)
    m = _channel_mean(x)
    assert torch.allclose(d.apply("saturation", x, {"s": s}), (x - m) * s.view(2, 1, 1, 1) + m)
    c = torch.tensor([0.6, 1.37], dtype=torch.float64)
    m = _image_mean(x)
    assert torch.allclose(d.apply("contrast", x, {"c": c}), (x - m) * c.view(2, 1, 1, 1) + m)


def _reproduced_uniforms(seed, n, count, num_ops=1):
    ref = gen(seed)
    op = int(torch.randint(num_ops, (1,), generator=ref))
    return op, [torch.rand(n, generator=ref).double().view(n, 1, 1, 1) for _ in range(count)]


@pytest.mark.parametrize("seed", [0, 1])
def test_colour_per_image_against_hand_formulas(seed):
    n = 6
    x = torch.randn(n, 3, 4, 4, generator=gen(10), dtype=torch.float64)
    _, (u,) = _reproduced_uniforms(seed, n, 1)
    assert torch.allclose(DSA("brightness").per_image(x, gen(seed)), x + (u - 0.5))
    m = _channel_mean(x)
    assert torch.allclose(DSA("saturation").per_image(x, gen(seed)), (x - m) * (2 * u) + m)
    m = _image_mean(x)
    assert torch.allclose(DSA("contrast").per_image(x, gen(seed)), (x - m) * (u + 0.5) + m)
    # "color" = brightness, then saturation, then contrast, uniforms drawn in that order
    _, (ub, us, uc) = _reproduced_uniforms(seed, n, 3)
    y = x + (ub - 0.5)
    y = (y - _channel_mean(y)) * (2 * us) + _channel_mean(y)
    y = (y - _image_mean(y)) * (uc + 0.5) + _image_mean(y)
    assert torch.allclose(DSA("color").per_image(x, gen(seed)), y)


# ----------------------------------------------------------------------------- modes

@pytest.mark.parametrize("n", [1, 5])
def test_siamese_groups_map_to_sorted_ids_and_share_draws(n):
    # one op: brightness; draws are per group in sorted-id order
    x = torch.randn(n, 2, 3, 3, generator=gen(11), dtype=torch.float64)
    groups = torch.tensor([5, 2, 5, 9, 2][:n])
    ids = sorted(set(groups.tolist()))
    out = DSA("brightness").siamese(x, groups, gen(12))
    ref = gen(12)
    torch.randint(1, (len(ids),), generator=ref)
    u = torch.rand(len(ids), generator=ref).double()
    for k in range(n):
        shift = u[ids.index(int(groups[k]))] - 0.5
        assert torch.allclose(out[k], x[k] + shift)


def test_siamese_two_op_strategy_reproduced():
    # op choice per group, then every op's parameters for every group
    x = torch.randn(8, 3, 4, 4, generator=gen(13), dtype=torch.float64)
    groups = torch.tensor([3, 1, 0, 3, 1, 0, 2, 2])
    out = DSA("brightness_contrast").siamese(x, groups, gen(14))
    ref = gen(14)
    choice = torch.randint(2, (4,), generator=ref)
    b = torch.rand(4, generator=ref).double() - 0.5
    c = torch.rand(4, generator=ref).double() + 0.5
    assert set(choice.tolist()) == {0, 1}  # seed chosen so both ops occur
    for k in range(8):
        gi = int(groups[k])  # ids are 0..3 already
        if choice[gi] == 0:
            exp = x[k] + b[gi]
        else:
            m = x[k].mean()
            exp = (x[k] - m) * c[gi] + m
        assert torch.allclose(out[k], exp)


def test_siamese_single_group_batch_of_one_rotate():
    x = asym(n=1, h=9, w=9)
    out = DSA("rotate").siamese(x, None, gen(15))
    ref = gen(15)
    torch.randint(1, (1,), generator=ref)
    angle = (torch.rand(1, generator=ref) - 0.5) * 2 * math.radians(15.0)
    assert torch.allclose(out, _rotate(x, math.degrees(float(angle))), atol=1e-6)
    assert not torch.allclose(out, x, atol=1e-3)


def test_per_image_draws_per_image_and_one_op_per_call():
    x = torch.zeros(6, 1, 2, 2)
    chosen = set()
    for seed in range(6):
        out = DSA("brightness_contrast").per_image(x, gen(seed))
        ref = gen(seed)
        k = int(torch.randint(2, (1,), generator=ref))
        chosen.add(k)
        u = torch.rand(6, generator=ref)
        if k == 0:   # brightness: six independent shifts
            assert torch.allclose(out, (u - 0.5).view(6, 1, 1, 1).expand_as(out))
            assert len(set(out[:, 0, 0, 0].tolist())) == 6
        else:        # contrast of a constant image: unchanged
            assert torch.equal(out, x)
    assert chosen == {0, 1}
