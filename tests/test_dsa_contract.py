"""DSA's contract beyond the op maths: the identity strategy, the normalised strategy name, exact
parameter draws reproduced from a cloned generator, two label groups choosing different ops, a
batch of one, empty batches leaving the generator untouched, ``__call__``, dtypes and messages."""
import re

import pytest
import torch

from baselines.harness.dsa import DSA


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def images(n=4, c=3, h=8, w=8, seed=1):
    return torch.randn(n, c, h, w, generator=gen(seed))


# -- strategy parsing -----------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["none", "", "None", "NONE"])
def test_identity_strategy(strategy):
    d = DSA(strategy)
    assert d.ops == [] and d.strategy == "none"
    assert repr(d) == "DSA(strategy='none')"
    x, g = images(3), gen(4)
    state = g.get_state()
    assert d.siamese(x, torch.tensor([0, 1, 0]), g) is x
    assert d.per_image(x, g) is x
    assert d(x, None, g) is x
    assert torch.equal(g.get_state(), state)          # nothing drawn


def test_strategy_name_is_the_ops_joined():
    assert DSA("crop_flip").strategy == "crop_flip"
    assert DSA("crop_flip").ops == ["crop", "flip"]
    assert DSA("crop_flip", flip=False).strategy == "crop"
    assert DSA("flip", flip=False).strategy == "none"
    assert DSA("flip", flip=False).ops == []
    assert DSA().strategy == "color_crop_cutout_flip_scale_rotate"
    assert repr(DSA("crop")) == "DSA(strategy='crop')"


def test_unknown_op_messages():
    valid = sorted({"color", "crop", "cutout", "flip", "scale", "rotate", "brightness",
                    "saturation", "contrast"})
    with pytest.raises(ValueError, match="^" + re.escape(
            f"unknown DSA op(s) ['blur']; valid: {valid}") + "$"):
        DSA("color_blur")
    d = DSA("crop")
    with pytest.raises(ValueError, match=r"^unknown DSA op 'blur'$"):
        d.draw_params("blur", 2, 8, 8, gen())
    with pytest.raises(ValueError, match=r"^unknown DSA op 'blur'$"):
        d.apply("blur", images(2), {})


# -- parameters ------------------------------------------------------------------------------------
def test_brightness_draw_is_centred_uniform_times_brightness():
    b = DSA(brightness=0.5).draw_params("brightness", 1000, 8, 8, gen(3))["b"]
    u = torch.rand(1000, generator=gen(3))
    torch.testing.assert_close(b, (u - 0.5) * 0.5, rtol=0, atol=0)
    assert -0.25 <= float(b.min()) and float(b.max()) < 0.25
    assert float(b.max() - b.min()) > 0.45              # the whole range is used


def test_cutout_corner_is_an_integer_for_odd_sides():
    p = DSA().draw_params("cutout", 50, 9, 9, gen(0))
    assert p["x0"].dtype == torch.long and p["y0"].dtype == torch.long
    # side int(0.5 * 9 + 0.5) = 5 (odd): centre in [0, 8], corner = centre - 2
    cx = torch.randint(0, 9, (50,), generator=gen(0))
    assert torch.equal(p["x0"], cx - 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_apply_keeps_the_input_dtype(dtype):
    x = images(2).to(dtype)
    p = {"b": torch.tensor([0.25, -0.5])}            # float32 parameters
    out = DSA().apply("brightness", x, p)
    assert out.dtype == dtype
    assert torch.equal(out, x + torch.tensor([0.25, -0.5], dtype=dtype).view(2, 1, 1, 1))


# -- siamese mode ------------------------------------------------------------------------------------
def _naive_siamese(d, x, groups, g):
    """Reference: the same draws as documented (op choices, then every op's parameters), then
    each group transformed on its own with its op and its parameter draw."""
    ids = sorted(set(groups.tolist()))
    choice = torch.randint(len(d.ops), (len(ids),), generator=g)
    params = [d.draw_params(op, len(ids), x.shape[2], x.shape[3], g) for op in d.ops]
    out = torch.empty_like(x)
    for j, gid in enumerate(ids):
        rows = (groups == gid).nonzero().flatten()
        k = int(choice[j])
        p = {name: v[j].repeat(rows.numel()) for name, v in params[k].items()}
        out[rows] = d.apply(d.ops[k], x[rows], p)
    return out, choice


@pytest.mark.parametrize("num_groups", [1, 2, 3])
def test_siamese_equals_per_group_reference(num_groups):
    d = DSA("flip_brightness")
    x = images(6)
    groups = {1: torch.full((6,), 5), 2: torch.tensor([4, 1, 4, 1, 1, 4]),
              3: torch.tensor([7, 3, 7, 3, 9, 9])}[num_groups]
    mixed = 0
    for seed in range(8):
        expected, choice = _naive_siamese(d, x, groups, gen(seed))
        got = d.siamese(x, groups, gen(seed))
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        mixed += int(len(set(choice.tolist())) > 1)
    if num_groups > 1:
        assert mixed > 0        # some seed makes the groups choose different ops


def test_two_groups_with_different_ops():
    # seed chosen so that group 0 flips and group 1 gets brightness (asserted below)
    d = DSA("flip_brightness")
    x = images(4)
    groups = torch.tensor([0, 1, 0, 1])
    for seed in range(50):
        choice = torch.randint(2, (2,), generator=gen(seed))
        if choice.tolist() == [0, 1]:
            break
    assert choice.tolist() == [0, 1]
    g = gen(seed)
    torch.randint(2, (2,), generator=g)
    flip = d.draw_params("flip", 2, 8, 8, g)["flip"]
    b = d.draw_params("brightness", 2, 8, 8, g)["b"]
    out = d.siamese(x, groups, gen(seed))
    for i in (0, 2):
        assert torch.equal(out[i], x[i].flip(2) if flip[0] else x[i])
    for i in (1, 3):
        torch.testing.assert_close(out[i], x[i] + b[1], rtol=0, atol=1e-6)


def test_siamese_empty_batch_returns_it_and_draws_nothing():
    d = DSA()
    x = images(3)[:0]
    for groups in (None, torch.zeros(0, dtype=torch.long)):
        g = gen(2)
        state = g.get_state()
        assert d.siamese(x, groups, g) is x
        assert torch.equal(g.get_state(), state)


def test_groups_shape_message():
    with pytest.raises(ValueError, match=r"^groups must have shape \(4,\), got \(3,\)$"):
        DSA().siamese(images(4), torch.tensor([0, 1, 2]), gen())


def test_call_is_siamese():
    d = DSA()
    x = images(6)
    groups = torch.tensor([0, 1, 2, 0, 1, 2])
    for seed in range(3):
        assert torch.equal(d(x, groups, gen(seed)), d.siamese(x, groups, gen(seed)))
    assert torch.equal(d(x, None, gen(5)), d.siamese(x, None, gen(5)))


# -- per-image mode ----------------------------------------------------------------------------------
def test_per_image_batch_of_one_is_augmented():
    x = images(1)
    g = gen(7)
    out = DSA("brightness").per_image(x, g)
    ref = gen(7)
    torch.randint(1, (1,), generator=ref)                 # the op choice
    b = (torch.rand(1, generator=ref) - 0.5) * 1.0
    torch.testing.assert_close(out, x + b.view(1, 1, 1, 1), rtol=0, atol=1e-6)
    assert not torch.equal(out, x)
    assert torch.equal(g.get_state(), ref.get_state())     # consumed exactly those draws


def test_per_image_empty_batch_returns_it_and_draws_nothing():
    x = images(2)[:0]
    g = gen(1)
    state = g.get_state()
    assert DSA().per_image(x, g) is x
    assert torch.equal(g.get_state(), state)
