import math

import pytest
import torch

from baselines.harness.dsa import DSA, OPS


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def images(n=4, c=3, h=16, w=16, seed=1):
    return torch.randn(n, c, h, w, generator=gen(seed))


@pytest.mark.parametrize("op", list(OPS) + [OPS[0] + "_" + "_".join(OPS[1:])])
def test_siamese_halves_identical(op):
    a = images(3)
    out = DSA(op).siamese(torch.cat([a, a]), None, gen(5))
    assert torch.equal(out[:3], out[3:])


def test_groups_share_transform_and_differ_between_groups():
    x = images(1).repeat(8, 1, 1, 1)
    groups = torch.tensor([5, 2, 5, 2, 9, 0, 9, 0])  # arbitrary, unsorted ids
    differing = 0
    for seed in range(10):
        out = DSA().siamese(x, groups, gen(seed))
        for g in groups.unique():
            part = out[groups == g]
            assert torch.equal(part[0], part[1])
        distinct = {tuple(out[groups == g][0].flatten().tolist()) for g in groups.unique()}
        differing += int(len(distinct) > 1)
    assert differing >= 8


def test_per_image_differs_per_image():
    x = images(1).repeat(6, 1, 1, 1)
    for op in ["color", "crop", "scale", "rotate", "cutout"]:
        out = DSA(op).per_image(x, gen(3))
        distinct = {tuple(o.flatten()[:64].tolist()) for o in out}
        assert len(distinct) > 1, op


def test_same_seed_same_output_and_no_global_rng():
    x = images(8)
    groups = torch.arange(8) % 3
    torch.manual_seed(0)
    a = DSA().siamese(x, groups, gen(11))
    torch.manual_seed(123)
    b = DSA().siamese(x, groups, gen(11))
    assert torch.equal(a, b)
    assert torch.equal(DSA().per_image(x, gen(4)), DSA().per_image(x, gen(4)))


def test_brightness_range():
    x = torch.zeros(500, 3, 4, 4)
    out = DSA("brightness").per_image(x, gen())
    shift = out[:, 0, 0, 0]
    assert (out == shift.view(-1, 1, 1, 1)).all()
    assert shift.min() >= -0.5 and shift.max() <= 0.5
    assert shift.max() - shift.min() > 0.9


def test_color_param_ranges():
    d = DSA()
    p = d.draw_params("color", 2000, 32, 32, gen())
    assert -0.5 <= p["b"].min() and p["b"].max() < 0.5
    assert 0 <= p["s"].min() and p["s"].max() < 2.0 and p["s"].max() > 1.9
    assert 0.5 <= p["c"].min() and p["c"].max() < 1.5


def test_saturation_and_contrast_ops():
    x = images(2)
    d = DSA()
    m = x.mean(1, keepdim=True)
    out = d.apply("saturation", x, {"s": torch.tensor([0.0, 1.0])})
    assert torch.allclose(out[0], m[0].expand_as(x[0])) and torch.allclose(out[1], x[1], atol=1e-6)
    out = d.apply("contrast", x, {"c": torch.tensor([0.0, 1.0])})
    assert torch.allclose(out[0], x[0].mean().expand_as(x[0])) and torch.allclose(out[1], x[1], atol=1e-6)


def test_crop_shift_bounds_and_zero_fill():
    d = DSA()
    p = d.draw_params("crop", 5000, 32, 28, gen())
    assert p["tx"].min() == -4 and p["tx"].max() == 4   # int(0.125*32 + 0.5)
    assert p["ty"].min() == -4 and p["ty"].max() == 4   # int(0.125*28 + 0.5)
    x = torch.arange(36.0).view(1, 1, 6, 6) + 1
    out = d.apply("crop", x, {"tx": torch.tensor([2]), "ty": torch.tensor([-1])})
    assert torch.equal(out[0, 0, :4, 1:], x[0, 0, 2:, :5])
    assert (out[0, 0, 4:] == 0).all() and (out[0, 0, :, 0] == 0).all()


def test_cutout_square():
    d = DSA("cutout")
    x = torch.ones(300, 1, 32, 32)
    out = d.per_image(x, gen())
    zeros = (out == 0).flatten(1).sum(1)
    assert zeros.max() == 16 * 16 and zeros.min() > 0
    # a zeroed region is a (clipped) axis-aligned box
    for o in out[:20, 0]:
        rows, cols = (o == 0).any(1).nonzero(), (o == 0).any(0).nonzero()
        assert (o == 0).sum() == len(rows) * len(cols) and len(rows) <= 16 and len(cols) <= 16


def test_scale_rotate_param_ranges():
    d = DSA()
    p = d.draw_params("scale", 5000, 32, 32, gen())
    for k in ("sx", "sy"):
        assert p[k].min() >= 1 / 1.2 and p[k].max() <= 1.2
        assert p[k].min() < 0.85 and p[k].max() > 1.18
    assert not torch.equal(p["sx"], p["sy"])
    a = d.draw_params("rotate", 5000, 32, 32, gen())["angle"] * 180 / math.pi
    assert a.min() >= -15 and a.max() <= 15 and a.min() < -14.5 and a.max() > 14.5


def test_identity_params_keep_image():
    x = images(2)
    d = DSA()
    assert torch.allclose(d.apply("scale", x, {"sx": torch.ones(2), "sy": torch.ones(2)}), x,
                          atol=1e-5)
    assert torch.allclose(d.apply("rotate", x, {"angle": torch.zeros(2)}), x, atol=1e-5)


def test_flip_false_never_flips():
    d = DSA(flip=False)
    assert "flip" not in d.ops and len(d.ops) == 5
    x = images(4)
    assert torch.equal(DSA("flip", flip=False).siamese(x, None, gen()), x)
    flipped = 0
    for s in range(20):
        out = DSA("flip").per_image(x, gen(s))
        flipped += int(torch.equal(out[0], x[0].flip(2)))
    assert 0 < flipped < 20


def test_batch_of_one_and_empty_groups_any_ids():
    x = images(1)
    for op in OPS:
        assert DSA(op).siamese(x, None, gen()).shape == x.shape
        assert DSA(op).per_image(x, gen()).shape == x.shape
        assert DSA(op).siamese(x, torch.tensor([42]), gen()).shape == x.shape


def test_gradient_flows():
    for op in OPS:
        x = images(3).requires_grad_()
        out = DSA(op).siamese(x, torch.tensor([0, 1, 0]), gen())
        out.square().sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0, op
        x.grad = None
        DSA(op).per_image(x, gen()).square().sum().backward()
        assert x.grad.abs().sum() > 0, op


def test_unknown_op_rejected():
    with pytest.raises(ValueError):
        DSA("color_blur")


def test_multi_group_gradient_routing():
    # brightness is additive, so d(sum(w * out))/dx == w exactly if every image is routed back
    x = images(6).requires_grad_()
    w = torch.randn(6, 3, 16, 16)
    d = DSA("brightness_flip")
    out = d.siamese(x, torch.tensor([0, 1, 2, 0, 1, 2]), gen(0))
    (w * out).sum().backward()
    flipped = [not torch.allclose(out[i] - out[i].mean(), x[i] - x[i].mean(), atol=1e-5) for i in range(6)]
    expected = torch.stack([w[i].flip(2) if f else w[i] for i, f in enumerate(flipped)])
    assert torch.allclose(x.grad, expected)
