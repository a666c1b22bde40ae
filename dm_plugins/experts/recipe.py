"""How experts are trained: :class:`ExpertRecipe`, every setting of expert training in one value.

Contract:

* The fields are the settings :func:`dm_plugins.experts.train_expert` trains with; the defaults
  are PTLM's recipe (70 epochs, SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 256,
  constant lr, no CutMix, no augmentation). The recipe is frozen: pools and processes share it.
* ``augment`` is the callable ``augment(x, generator) -> x`` (or None); ``augment_name`` names
  it. Without a name, a callable is named by its ``__qualname__`` (or its type's name). Only the
  name is recorded, compared and hashed: the name stands for the augmentation.
* :meth:`ExpertRecipe.manifest` is the dict a pool's manifest records in ``meta`` (with the
  caller's own ``meta``) and compares on reuse, key for key as earlier versions wrote it: the
  schedule keys (``lr_milestones``, ``lr_gamma``, ``cutmix_p``) only when a schedule or CutMix
  is used, so pools saved before those keys existed still match.
  :meth:`ExpertRecipe.from_manifest` reads it back (the augmentation by name only).
* :meth:`ExpertRecipe.digest` is a short hash of that dict, the schedule keys filled in at their
  defaults and the real-valued settings as floats: equal for recipes that train alike (a
  setting without effect, ``lr_gamma`` without milestones, does not count), different when a
  recorded setting differs, and the same in every process, run and Python version (SHA-256 of
  canonical JSON, never ``hash()``). Manifests record it as ``recipe_hash``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Callable, Sequence

SCHEDULE_DEFAULTS = {"lr_milestones": [], "lr_gamma": 0.1, "cutmix_p": 0.0}
"""Recipe keys :meth:`ExpertRecipe.manifest` leaves out at these values."""
RECIPE_KEYS = ("epochs", "seed", "lr", "momentum", "weight_decay", "batch_size", "augment",
               *SCHEDULE_DEFAULTS)
"""Every key a recipe can record in a manifest's ``meta``."""
_REAL_KEYS = ("lr", "momentum", "weight_decay", "lr_gamma", "cutmix_p")


def with_schedule_defaults(recipe: dict) -> dict:
    """``recipe`` (a manifest's ``meta``) with the schedule keys it leaves out filled in."""
    return {**SCHEDULE_DEFAULTS, **recipe}


@dataclass(frozen=True)
class ExpertRecipe:
    """Every setting expert training uses (see the module docstring for the contract).

    Args:
        epochs, lr, momentum, weight_decay, batch_size: SGD's settings.
        seed: the training seed; expert k's initial weights and batches derive from (seed, k).
        lr_milestones: epochs where the lr is multiplied by ``lr_gamma``.
        cutmix_p: CutMix probability per batch.
        augment: ``augment(x, generator) -> x`` applied to each batch, or None.
        augment_name: the augmentation's recorded name (default: the callable's name).
    """

    epochs: int = 70
    seed: int = 0
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    lr_milestones: Sequence[int] = ()
    lr_gamma: float = 0.1
    cutmix_p: float = 0.0
    augment: Callable | None = field(default=None, compare=False)
    augment_name: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "lr_milestones", tuple(int(m) for m in self.lr_milestones))
        if self.augment is not None and self.augment_name is None:
            object.__setattr__(self, "augment_name", getattr(
                self.augment, "__qualname__", type(self.augment).__name__))

    def manifest(self) -> dict:
        """How the experts were trained, as a manifest records it in ``meta``."""
        recipe = {"epochs": int(self.epochs), "seed": int(self.seed), "lr": self.lr,
                  "momentum": self.momentum, "weight_decay": self.weight_decay,
                  "batch_size": int(self.batch_size), "augment": self.augment_name or "none"}
        if self.lr_milestones:
            recipe.update(lr_milestones=list(self.lr_milestones), lr_gamma=self.lr_gamma)
        if self.cutmix_p:
            recipe["cutmix_p"] = self.cutmix_p
        return recipe

    def digest(self) -> str:
        """A 12-hex-digit hash of :meth:`manifest`, stable across processes and runs."""
        canonical = with_schedule_defaults(self.manifest())
        for key in _REAL_KEYS:
            canonical[key] = float(canonical[key])
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @classmethod
    def from_manifest(cls, meta: dict) -> "ExpertRecipe":
        """The recipe a manifest's ``meta`` records (keys other than the recipe's are ignored;
        the augmentation comes back as its name, without the callable)."""
        missing = [k for k in RECIPE_KEYS if k not in SCHEDULE_DEFAULTS and k not in meta]
        if missing:
            raise ValueError(f"the manifest records no {missing[0]!r}: it holds no expert recipe")
        known = with_schedule_defaults(meta)
        augment = known["augment"]
        return cls(epochs=known["epochs"], seed=known["seed"], lr=known["lr"],
                   momentum=known["momentum"], weight_decay=known["weight_decay"],
                   batch_size=known["batch_size"], lr_milestones=known["lr_milestones"],
                   lr_gamma=known["lr_gamma"], cutmix_p=known["cutmix_p"],
                   augment_name=None if augment == "none" else augment)


_DEFAULTS = {f.name: f.default for f in fields(ExpertRecipe)}


def recipe_from(recipe: ExpertRecipe | None, **settings) -> ExpertRecipe:
    """``recipe``, or (without one) the recipe of the loose keyword ``settings`` (the fields of
    :class:`ExpertRecipe`). With a recipe, every setting must be left at its default (None
    counts as left out): a :class:`TypeError` names the ones that are not."""
    if recipe is None:
        return ExpertRecipe(**settings)
    if not isinstance(recipe, ExpertRecipe):
        raise TypeError(f"recipe must be an ExpertRecipe, not {type(recipe).__name__}")
    given = sorted(name for name, value in settings.items() if not _left_out(name, value))
    if given:
        raise TypeError(f"give the training settings either as recipe= or as keywords, not "
                        f"both ({', '.join(given)} given with a recipe)")
    return recipe


def _left_out(name: str, value) -> bool:
    default = _DEFAULTS[name]
    if value is None or default is None:
        return value is None
    if name == "lr_milestones":
        return len(value) == 0
    return value == default
