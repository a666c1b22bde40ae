"""The expert pool shared by pseudo-trajectory matching and pseudo-label matching.

An expert is a network trained on the real data, stored with the random initial weights it
started from (theta_init) and its trained weights (theta_star) (PTLM section 3; see
``docs/methods.md#pseudo-trajectory-matching``). The pool keeps every expert's weights in memory
and answers "which expert does iteration t use?" with a deterministic function of (seed, t), so
PTM and PLM pick the same expert without knowing about each other.

Getting experts is one call, :meth:`ExpertPool.load_or_train`: it loads what a directory holds
and trains (and saves, one expert at a time) what is missing, from plain tensors. How they are
trained is one :class:`ExpertRecipe` (or the same settings as keywords), recorded in the
manifest and hashed.

Every network the pool builds comes from the caller's factory inside
:func:`dm_plugins.seeding.preserved_global_rng`: a factory that reseeds the global RNG (research
code often seeds from the wall clock) neither changes the caller's RNG stream nor the experts'
initial weights, which are re-drawn from a seed derived from (seed, k).

The parts:

* ``recipe``: :class:`ExpertRecipe`, every training setting, its manifest dict and its hash;
* ``pool``: :class:`Expert` and :class:`ExpertPool` in memory (the pick, networks, weights);
* ``storage``: the files (``manifest.json``, ``expert_<k>.pt``) and the checks on reuse;
* ``training``: :func:`train_expert` and training a pool, in one process or several.
"""
from .pool import _PICK_STREAM, Expert, ExpertPool, build_network
from .recipe import ExpertRecipe
from .storage import FORMAT, MANIFEST, RECIPE_HASH
from .training import (_INIT_STREAM, _TRAIN_STREAM, _accuracy_text, describe_training,
                       factory_device, train_expert)

__all__ = ["Expert", "ExpertPool", "ExpertRecipe", "build_network", "describe_training",
           "factory_device", "train_expert", "FORMAT", "MANIFEST", "RECIPE_HASH"]
