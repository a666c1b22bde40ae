"""IDC multi-formation: each stored image holds a ``factor x factor`` mosaic of sub-images.

Source: Kim et al., "Dataset Condensation via Efficient Synthetic-Data Parameterization" (IDC),
ICML 2022, "multi-formation"; see docs/methods.md#factorisation. The storage budget stays IPC
images per class; matching and evaluation use the decoded ``IPC * factor**2`` images per class.

Cell layout (shared by :func:`mosaic_init` and :func:`decode`): the H x W canvas is cut at the
integer edges ``round(linspace(0, H, f + 1))`` (rows) and ``round(linspace(0, W, f + 1))``
(columns), so cells differ by at most one pixel when H is not divisible by f (H = 32, f = 3:
row edges 0, 11, 21, 32 -> heights 11, 10, 11). Cells are numbered row-major: cell ``j`` is at
mosaic row ``j // f``, column ``j % f``. Resizing is bilinear with ``align_corners=False`` and
no antialiasing. IDC itself pads the canvas to a multiple of f instead; for f dividing H both
layouts coincide.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cell_edges", "mosaic_init", "decode"]


def cell_edges(size: int, factor: int) -> List[int]:
    """Integer cell boundaries ``round(linspace(0, size, factor + 1))`` (length factor + 1)."""
    if factor < 1 or factor > size:
        raise ValueError(f"factor must be in [1, {size}], got {factor}")
    return [int(v) for v in torch.linspace(0, size, factor + 1, dtype=torch.float64).round()]


def _cells(height: int, width: int, factor: int):
    rows, cols = cell_edges(height, factor), cell_edges(width, factor)
    return [(rows[j // factor], rows[j // factor + 1], cols[j % factor], cols[j % factor + 1])
            for j in range(factor * factor)]


def _resize(x: Tensor, size: Tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)


def mosaic_init(images: Tensor, factor: int) -> Tensor:
    """Build stored images from real ones.

    Args:
        images: (n * f * f, C, H, W) real images (normalised or pixel space: any).
        factor: f >= 1.

    Returns:
        (n, C, H, W): stored image ``k`` is the mosaic of ``images[k*f*f:(k+1)*f*f]``, image
        ``k*f*f + j`` resized into cell ``j`` (row-major, see module docstring). ``factor == 1``
        returns ``images`` unchanged.
    """
    if factor == 1:
        return images
    total, c, h, w = images.shape
    per = factor * factor
    if total % per:
        raise ValueError(f"need a multiple of factor**2 = {per} images, got {total}")
    grouped = images.reshape(total // per, per, c, h, w)
    out = images.new_empty(total // per, c, h, w)
    for j, (r0, r1, c0, c1) in enumerate(_cells(h, w, factor)):
        out[:, :, r0:r1, c0:c1] = _resize(grouped[:, j], (r1 - r0, c1 - c0))
    return out


def decode(stored: Tensor, labels: Tensor, factor: int) -> Tuple[Tensor, Tensor]:
    """Decode stored images into ``factor**2`` full-size images each.

    Args:
        stored: (n, C, H, W) stored images.
        labels: (n,) hard labels or (n, K) soft labels of the stored images.
        factor: f >= 1; 1 returns the inputs unchanged.

    Returns:
        ``(images, labels)``: (n*f*f, C, H, W), where image ``k*f*f + j`` is cell ``j`` of stored
        image ``k`` (same row-major order as :func:`mosaic_init`) upsampled bilinearly to H x W;
        labels repeated f*f times contiguously (``repeat_interleave``). Differentiable w.r.t.
        ``stored`` (crop + upsample), so gradients reach the stored pixels.
    """
    if factor == 1:
        return stored, labels
    n, c, h, w = stored.shape
    crops = [_resize(stored[:, :, r0:r1, c0:c1], (h, w)) for r0, r1, c0, c1 in _cells(h, w, factor)]
    images = torch.stack(crops, dim=1).reshape(n * factor * factor, c, h, w)
    return images, labels.repeat_interleave(factor * factor, dim=0)
