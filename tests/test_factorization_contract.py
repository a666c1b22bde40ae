"""Factorisation edge cases: the factor range of cell_edges (both ends), its float64 rounding, and
the full error messages."""
import re

import pytest
import torch

from baselines.harness.factorization import cell_edges, decode, mosaic_init


@pytest.mark.parametrize("factor", [0, -1, 9, 100])
def test_factor_outside_one_to_size_is_refused(factor):
    with pytest.raises(ValueError, match="^" + re.escape(f"factor must be in [1, 8], got {factor}")
                       + "$"):
        cell_edges(8, factor)


def test_factor_equal_to_size_gives_one_pixel_cells():
    assert cell_edges(8, 8) == list(range(9))
    assert cell_edges(8, 1) == [0, 8]
    # decode with f = H: every decoded image is one stored pixel, upsampled (a constant image)
    stored = torch.arange(16.0).view(1, 1, 4, 4)
    images, labels = decode(stored, torch.tensor([3]), 4)
    assert images.shape == (16, 1, 4, 4) and labels.tolist() == [3] * 16
    for j in range(16):
        assert torch.equal(images[j], torch.full((1, 4, 4), float(j)))


def test_cell_edges_use_float64_linspace_rounding():
    # Golden values from torch.linspace(0, 61, 15, dtype=float64).round() (CPU). Edge 7 is
    # 61 * 7 / 14 = 30.5 exactly; float64 linspace gives 30.500000000000004 -> 31, whereas float32
    # (and numpy's linspace) give 30. Stored synthetic sets were cut with the float64 rule, so the
    # layout must not change with the default dtype.
    assert cell_edges(61, 14) == [0, 4, 9, 13, 17, 22, 26, 31, 35, 39, 44, 48, 52, 57, 61]
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert cell_edges(61, 14)[7] == 31
    finally:
        torch.set_default_dtype(old)
    # away from exact halves the rule is plain rounding of k * size / factor
    for size, factor in [(32, 3), (28, 5), (20, 6)]:
        assert cell_edges(size, factor) == [round(k * size / factor) for k in range(factor + 1)]


def test_mosaic_init_message():
    with pytest.raises(ValueError, match=r"^need a multiple of factor\*\*2 = 4 images, got 6$"):
        mosaic_init(torch.rand(6, 1, 4, 4), 2)
