"""Differentiable Siamese Augmentation (DSA), vectorised and explicitly seeded.

Source: Zhao & Bilen, "Dataset Condensation with Differentiable Siamese Augmentation", ICML 2021,
with the parameters and the single-op ("S") mode that the DM code (Zhao & Bilen, WACV/CVPR 2023)
uses: strategy ``color_crop_cutout_flip_scale_rotate``, one op of the strategy picked per call
("color" counts as one op = brightness, then saturation, then contrast). See
docs/methods.md#dsa.

Differences from the reference code, all deliberate:

* Randomness comes only from an explicit ``torch.Generator`` (the reference seeds the global RNG
  from the wall clock), so the same generator state gives the same output.
* Siamese mode takes a ``groups`` vector: every image of a group gets the same op and the same
  parameters (one draw per group). One call can thus augment the real and synthetic batches of all
  classes at once, with an independent draw per class. The reference draws per image and then
  copies image 0's parameters over the batch in place, which fails for a batch of one; we never
  write in place, so any batch size works.
* No Python loop over images: parameters are drawn as tensors and applied with batched tensor ops;
  the only loop is over the (at most six) ops of the strategy.

Ops work in whatever space ``x`` is in (DM augments normalised images, as the official code does).
All ops are differentiable w.r.t. ``x``.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DSA", "OPS"]

#: Every op name a strategy may contain.
OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")
_GEOMETRIC = ("crop", "scale", "rotate")


def _group_index(groups: Optional[Tensor], n: int,
                 num_groups: Optional[int] = None) -> tuple[Tensor, int]:
    """(per-image index of its group, number of groups drawn for).

    Without ``num_groups``: the index among the sorted distinct ids present, and their number.
    With it: the id itself (ids must lie in ``0 .. num_groups - 1``), and ``num_groups``, so a
    group's draw depends on its id, not on which other groups are present."""
    if groups is None:
        return torch.zeros(n, dtype=torch.long), 1 if num_groups is None else int(num_groups)
    if groups.shape != (n,):
        raise ValueError(f"groups must have shape ({n},), got {tuple(groups.shape)}")
    if num_groups is not None:
        ids = groups.cpu().long()
        if int(num_groups) < 1 or (n and not 0 <= int(ids.min()) <= int(ids.max()) < num_groups):
            raise ValueError(f"group ids must lie in 0..{int(num_groups) - 1} when num_groups="
                             f"{num_groups}")
        return ids, int(num_groups)
    _, inverse = torch.unique(groups.cpu(), sorted=True, return_inverse=True)
    return inverse, int(inverse.max()) + 1


class DSA:
    """DSA augmenter with the exact DM/DSA parameters (docs/methods.md#dsa).

    Args:
        strategy: ops joined by ``_``, from :data:`OPS`; also accepted as single ops:
            ``brightness``, ``saturation``, ``contrast`` (useful to test one colour transform).
            ``"none"`` or ``""`` = identity.
        flip: ``False`` removes ``flip`` from the strategy (digit-like data, e.g. MNIST).
        ratio_scale: scale factors are uniform in ``[1/ratio_scale, ratio_scale]``, x and y
            independently.
        ratio_rotate: angle uniform in ``[-ratio_rotate, ratio_rotate]`` degrees.
        ratio_crop_pad: integer translation uniform in ``[-s, s]`` with
            ``s = int(ratio_crop_pad * H + 0.5)`` (rows; columns with W), zero fill.
        ratio_cutout: zero a square of side ``int(ratio_cutout * H + 0.5)`` (x ``W``) centred at a
            uniform random pixel, clipped at the borders (reference rounding; = int(0.5 H) for
            even H).
        brightness: ``x + (U - 0.5) * brightness``.
        saturation: ``(x - m_c) * (U * saturation) + m_c`` with ``m_c`` the per-pixel channel mean.
        contrast: ``(x - m) * (U + contrast) + m`` with ``m`` the per-image mean.

    ``U`` is uniform on [0, 1). Horizontal flip has probability 0.5.
    """

    def __init__(self, strategy: str = "color_crop_cutout_flip_scale_rotate", flip: bool = True,
                 ratio_scale: float = 1.2, ratio_rotate: float = 15.0,
                 ratio_crop_pad: float = 0.125, ratio_cutout: float = 0.5,
                 brightness: float = 1.0, saturation: float = 2.0, contrast: float = 0.5):
        names = [] if strategy.lower() in ("", "none") else strategy.split("_")
        valid = set(OPS) | {"brightness", "saturation", "contrast"}
        unknown = [n for n in names if n not in valid]
        if unknown:
            raise ValueError(f"unknown DSA op(s) {unknown}; valid: {sorted(valid)}")
        if not flip:
            names = [n for n in names if n != "flip"]
        self.ops: List[str] = names
        self.strategy = "_".join(names) if names else "none"
        self.ratio_scale = float(ratio_scale)
        self.ratio_rotate = float(ratio_rotate)
        self.ratio_crop_pad = float(ratio_crop_pad)
        self.ratio_cutout = float(ratio_cutout)
        self.brightness = float(brightness)
        self.saturation = float(saturation)
        self.contrast = float(contrast)
        self.prob_flip = 0.5

    def __repr__(self) -> str:
        return f"DSA(strategy={self.strategy!r})"

    # ------------------------------------------------------------------ parameters
    def draw_params(self, op: str, n: int, height: int, width: int,
                    generator: torch.Generator) -> Dict[str, Tensor]:
        """Draw the parameters of ``op`` for ``n`` independent units (images or groups).

        Returns a dict of tensors of shape ``(n,)`` on the generator's device:

        * ``brightness``: ``b`` = additive shift in ``[-brightness/2, brightness/2)``.
        * ``saturation``: ``s`` = factor in ``[0, saturation)``.
        * ``contrast``: ``c`` = factor in ``[contrast, contrast + 1)``.
        * ``color``: ``b``, ``s``, ``c`` as above.
        * ``crop``: integer ``tx`` in ``[-sh, sh]``, ``ty`` in ``[-sw, sw]``,
          ``sh = int(ratio_crop_pad*H + 0.5)``, ``sw`` likewise with W.
        * ``cutout``: integer top-left corner ``x0`` (rows), ``y0`` (columns) of the square,
          possibly negative (the square is clipped at the borders); the centre is uniform over
          ``[0, H - (side % 2 == 0 ? 0 : 1)]`` as in the reference code.
        * ``flip``: bool ``flip``.
        * ``scale``: ``sx``, ``sy`` in ``[1/ratio_scale, ratio_scale)``.
        * ``rotate``: ``angle`` in radians, ``[-ratio_rotate, ratio_rotate)`` degrees.
        """
        dev = generator.device

        def rand() -> Tensor:
            return torch.rand(n, generator=generator, device=dev)

        if op == "brightness":
            return {"b": (rand() - 0.5) * self.brightness}
        if op == "saturation":
            return {"s": rand() * self.saturation}
        if op == "contrast":
            return {"c": rand() + self.contrast}
        if op == "color":
            p = self.draw_params("brightness", n, height, width, generator)
            p.update(self.draw_params("saturation", n, height, width, generator))
            p.update(self.draw_params("contrast", n, height, width, generator))
            return p
        if op == "crop":
            sh = int(height * self.ratio_crop_pad + 0.5)
            sw = int(width * self.ratio_crop_pad + 0.5)
            return {"tx": torch.randint(-sh, sh + 1, (n,), generator=generator, device=dev),
                    "ty": torch.randint(-sw, sw + 1, (n,), generator=generator, device=dev)}
        if op == "cutout":
            ch, cw = self._cutout_size(height, width)
            cx = torch.randint(0, height + (1 - ch % 2), (n,), generator=generator, device=dev)
            cy = torch.randint(0, width + (1 - cw % 2), (n,), generator=generator, device=dev)
            return {"x0": cx - ch // 2, "y0": cy - cw // 2}
        if op == "flip":
            return {"flip": rand() < self.prob_flip}
        if op == "scale":
            lo, hi = 1.0 / self.ratio_scale, self.ratio_scale
            return {"sx": rand() * (hi - lo) + lo, "sy": rand() * (hi - lo) + lo}
        if op == "rotate":
            return {"angle": (rand() - 0.5) * 2.0 * self.ratio_rotate / 180.0 * math.pi}
        raise ValueError(f"unknown DSA op {op!r}")

    def _cutout_size(self, height: int, width: int):
        return int(height * self.ratio_cutout + 0.5), int(width * self.ratio_cutout + 0.5)

    # ------------------------------------------------------------------ ops
    def apply(self, op: str, x: Tensor, params: Dict[str, Tensor]) -> Tensor:
        """Apply ``op`` to ``x`` (N, C, H, W) with per-image ``params`` (tensors of shape (N,),
        any device; moved to ``x.device``). Out of place and differentiable w.r.t. ``x``."""
        p = {k: v.to(x.device) for k, v in params.items()}
        n, _, h, w = x.shape

        def col(v: Tensor) -> Tensor:
            return v.to(x.dtype).view(n, 1, 1, 1)

        if op == "brightness":
            return x + col(p["b"])
        if op == "saturation":
            m = x.mean(dim=1, keepdim=True)
            return (x - m) * col(p["s"]) + m
        if op == "contrast":
            m = x.mean(dim=[1, 2, 3], keepdim=True)
            return (x - m) * col(p["c"]) + m
        if op == "color":
            for sub in ("brightness", "saturation", "contrast"):
                x = self.apply(sub, x, p)
            return x
        if op == "crop":
            # Gather from a 1-pixel zero-padded copy; indices that fall outside the image are
            # clamped onto the zero border, which gives zero fill (as in the reference).
            rows = torch.arange(h, device=x.device).view(1, h, 1)
            cols = torch.arange(w, device=x.device).view(1, 1, w)
            ri = (rows + p["tx"].view(n, 1, 1) + 1).clamp(0, h + 1)
            ci = (cols + p["ty"].view(n, 1, 1) + 1).clamp(0, w + 1)
            flat = (ri * (w + 2) + ci).view(n, 1, h * w).expand(n, x.shape[1], h * w)
            padded = F.pad(x, [1, 1, 1, 1]).flatten(2)
            return padded.gather(2, flat).view_as(x)
        if op == "cutout":
            ch, cw = self._cutout_size(h, w)
            rows = torch.arange(h, device=x.device).view(1, h, 1)
            cols = torch.arange(w, device=x.device).view(1, 1, w)
            x0, y0 = p["x0"].view(n, 1, 1), p["y0"].view(n, 1, 1)
            hole = (rows >= x0) & (rows < x0 + ch) & (cols >= y0) & (cols < y0 + cw)
            return x * (~hole).unsqueeze(1).to(x.dtype)
        if op == "flip":
            return torch.where(p["flip"].view(n, 1, 1, 1), x.flip(3), x)
        if op in ("scale", "rotate"):
            theta = x.new_zeros(n, 2, 3)
            if op == "scale":
                theta[:, 0, 0] = p["sx"].to(x.dtype)
                theta[:, 1, 1] = p["sy"].to(x.dtype)
            else:
                a = p["angle"].to(x.dtype)
                cos, sin = torch.cos(a), torch.sin(a)
                theta[:, 0, 0], theta[:, 0, 1] = cos, -sin
                theta[:, 1, 0], theta[:, 1, 1] = sin, cos
            grid = F.affine_grid(theta, list(x.shape), align_corners=True)
            return F.grid_sample(x, grid, align_corners=True)
        raise ValueError(f"unknown DSA op {op!r}")

    # ------------------------------------------------------------------ public modes
    def siamese(self, x: Tensor, groups: Optional[Tensor], generator: torch.Generator,
                num_groups: Optional[int] = None) -> Tensor:
        """Siamese augmentation: one op choice and one parameter draw per group.

        Args:
            x: (N, C, H, W) images, any device; gradients flow back to ``x``.
            groups: (N,) integer group ids, or ``None`` (all images one group). Images with the
                same id get the identical transform (DM: a class's real and synthetic batches).
                Groups are ordered by sorted id; draws depend only on the number of groups and
                their order, not on the id values.
            generator: the only source of randomness.
            num_groups: draw for groups ``0 .. num_groups - 1`` and give each image the draw of
                its id, whichever ids are present (a class-sharded run holding some classes gets
                exactly the draws a run holding all ``num_groups`` classes gives them). None:
                draw for the groups present, as above. With every id present both agree.

        Consumes from ``generator``: the op choice for every group, then the parameters of every
        op of the strategy for every group (a fixed amount per call, whatever ops get chosen).
        """
        if not self.ops or x.shape[0] == 0:
            return x
        n, _, h, w = x.shape
        inverse, num_groups = _group_index(groups, n, num_groups)
        choice = torch.randint(len(self.ops), (num_groups,), generator=generator,
                               device=generator.device).cpu()
        group_params = [self.draw_params(op, num_groups, h, w, generator) for op in self.ops]
        image_choice = choice[inverse]

        if num_groups == 1:
            # Common case (DM per class): no subset indexing.
            k = int(choice[0])
            per_image = {name: v.cpu()[inverse] for name, v in group_params[k].items()}
            return self.apply(self.ops[k], x, per_image)

        out = None
        for k, op in enumerate(self.ops):
            idx = torch.nonzero(image_choice == k).flatten()
            if idx.numel() == 0:
                continue
            per_image = {name: v.cpu()[inverse[idx]] for name, v in group_params[k].items()}
            idx_dev = idx.to(x.device)
            y = self.apply(op, x.index_select(0, idx_dev), per_image)
            if out is None:
                out = y.new_empty(x.shape)
            # every image is written exactly once; autograd tracks the in-place copies
            out.index_copy_(0, idx_dev, y)
        return out

    def sequence(self, x: Tensor, groups: Optional[Tensor], generator: torch.Generator,
                 num_groups: Optional[int] = None) -> Tensor:
        """Siamese augmentation that applies the whole strategy, as IDC's ``DiffAug`` (which
        DANCE matches with, strategy ``color_crop_cutout``): ``flip`` and ``color`` first, then
        one geometric op (``crop``, ``scale`` or ``rotate``; one picked per group when the
        strategy has several), then ``cutout``. One parameter draw per group, as
        :meth:`siamese`; ``groups``, ``generator`` and ``num_groups`` as there.

        Consumes from ``generator``, in order: the parameters of flip, color (if in the
        strategy), the choice and the parameters of the geometric ops, then cutout's.
        """
        if not self.ops or x.shape[0] == 0:
            return x
        n, _, h, w = x.shape
        inverse, count = _group_index(groups, n, num_groups)

        def draw(op: str) -> Dict[str, Tensor]:
            return {k: v.cpu()[inverse]
                    for k, v in self.draw_params(op, count, h, w, generator).items()}

        for op in ("flip", "color", "brightness", "saturation", "contrast"):
            if op in self.ops:
                x = self.apply(op, x, draw(op))
        geometric = [op for op in self.ops if op in _GEOMETRIC]
        if len(geometric) == 1:
            x = self.apply(geometric[0], x, draw(geometric[0]))
        elif geometric:
            x = DSA.from_ops(self, geometric).siamese(x, groups, generator, num_groups)
        if "cutout" in self.ops:
            x = self.apply("cutout", x, draw("cutout"))
        return x

    @classmethod
    def from_ops(cls, template: "DSA", ops: List[str]) -> "DSA":
        """A DSA with ``template``'s parameters and the strategy ``ops``."""
        other = copy.copy(template)
        other.ops = list(ops)
        other.strategy = "_".join(ops) if ops else "none"
        return other

    def per_image(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Evaluation-mode augmentation: one op chosen for the whole call (as DM's single-op
        mode), its parameters drawn independently per image. Differentiable w.r.t. ``x``."""
        if not self.ops or x.shape[0] == 0:
            return x
        n, _, h, w = x.shape
        k = int(torch.randint(len(self.ops), (1,), generator=generator, device=generator.device))
        return self.apply(self.ops[k], x, self.draw_params(self.ops[k], n, h, w, generator))

    def __call__(self, x: Tensor, groups: Optional[Tensor], generator: torch.Generator) -> Tensor:
        """Alias of :meth:`siamese`."""
        return self.siamese(x, groups, generator)


def idc_per_image(strategy: str = "color_crop") -> Callable[[Tensor, torch.Generator], Tensor]:
    """IDC's training augmentation (``DiffAug(strategy, batch=False)``, which DANCE trains its
    experts and evaluates with): every op of ``strategy`` in :meth:`DSA.sequence` order, its
    parameters drawn per image. DANCE's default strategy is ``color_crop`` (no cutout, no
    flip). Fits ``augment(batch, generator)`` of :func:`dm_plugins.training.train_classifier`."""
    augment = DSA(strategy)

    def per_image(x: Tensor, generator: torch.Generator) -> Tensor:
        return augment.sequence(x, torch.arange(x.shape[0]), generator)
    return per_image
