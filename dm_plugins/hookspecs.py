"""Hook specifications of dm_plugins (pluggy project name ``"dm_plugins"``).

A DM-style host (the minimal loop in :mod:`dm_plugins.loop`, or an adapter in ``adapters/``)
calls these hooks at fixed points of every distillation iteration. A plugin is any object with
methods of these names decorated by :data:`hookimpl`; it may implement any subset.

One iteration of a host, in order::

    dm_update_extractor(...)          # extractor weights for this iteration
    (host computes real and synthetic features with the extractor)
    dm_select_real(...)               # once per class: which real samples to match
    (host computes the matching loss)
    dm_auxiliary_loss(...)            # extra losses on the synthetic images
    (host steps the synthetic images on matching + auxiliary loss)

``dm_setup`` runs once before the first iteration and ``dm_teardown`` once after the last.
Hosts always call hooks with keyword arguments; implementations may accept any subset of the
arguments listed (pluggy passes only the ones an implementation names).

Iterations are numbered ``t = 0 .. T-1`` with ``T = num_iterations`` (DESIGN.md section 2).
"""
from __future__ import annotations

import pluggy

PROJECT_NAME = "dm_plugins"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def dm_setup(context):
    """Prepare a plugin for a distillation run.

    Called once by the host, before the first iteration and before any other hook.

    :param dm_plugins.context.DistillContext context: what the run is: ``num_classes``, ``ipc``
        (stored images per class, the budget), ``num_iterations`` (T), ``extractor`` (the
        network the host computes features with; the same object is passed to every later
        :func:`dm_update_extractor` call), ``real`` (class-indexed real data, normalised),
        ``device`` and ``seed``.

    Use it to validate that the plugin fits the run (raise :class:`dm_plugins.PluginError` with a
    one-line message if not), to move state to ``context.device`` and to precompute anything
    that does not change during the run (PLM's pseudo-labels, PTM's weight tensors).

    Return value: ignored. Every registered implementation is called.
    """


@hookspec
def dm_update_extractor(extractor, iteration, num_iterations):
    """Set the feature extractor's weights for iteration ``iteration``.

    Called by the host at the start of every iteration, before any feature is computed.

    :param torch.nn.Module extractor: the host's preallocated feature extractor, to be modified
        in place (the host keeps using this object).
    :param int iteration: t, in ``0 .. num_iterations - 1``.
    :param int num_iterations: T.

    Return value: ``True`` if this implementation wrote the extractor's weights, ``None`` or
    ``False`` otherwise. The host re-initialises the extractor randomly (plain DM: a fresh random
    network every iteration) only when no implementation returned ``True``. If several
    implementations write weights, all are called in pluggy's order (last registered first) and
    the one called last wins; registering two extractor updaters is almost always a mistake.
    """


@hookspec
def dm_select_real(label, real_features, syn_features, iteration, num_iterations):
    """Choose which real samples of one class the matching loss uses.

    Called by the host once per class per iteration, after features are computed and before
    the matching loss; reuse the features, do not run the extractor again.

    :param int label: the class c.
    :param torch.Tensor real_features: (B, D) features of the class's (augmented) real batch,
        computed without a graph.
    :param torch.Tensor syn_features: (S, D) features of the class's (augmented, decoded)
        synthetic images. They carry the images' graph: detach before using them.
    :param int iteration: t.
    :param int num_iterations: T.

    Return value: a boolean keep-mask of shape (B,), or ``None`` to keep every sample.
    The host ANDs the masks of all implementations. Each implementation must keep at least one
    sample on its own; if the AND of several masks keeps nothing, the host falls back to the
    whole batch (a mean over no samples is undefined).
    """


@hookspec
def dm_auxiliary_loss(syn_images, syn_labels, iteration, num_iterations):
    """Return an extra loss on the synthetic images, added to the matching loss (Eq. 10).

    Called by the host once per iteration, after the matching loss is built and before the
    backward pass.

    :param torch.Tensor syn_images: (N, C, H, W) the synthetic images of this iteration in the
        form the extractor saw them (decoded, normalised, augmented), carrying their graph to
        the stored images.
    :param torch.Tensor syn_labels: (N,) their class labels (long).
    :param int iteration: t.
    :param int num_iterations: T.

    Return value: a scalar tensor connected to ``syn_images``'s graph, or ``None`` for no loss
    this iteration. The host sums the returned losses and adds the sum to the matching loss
    with weight 1. A loss should be summed over classes like the DM loss (per-class means,
    then a sum) so that its weight does not depend on how many classes a host batches together.
    """


@hookspec
def dm_teardown(context):
    """Release what :func:`dm_setup` built.

    Called once by the host after the last iteration (also when the run stops with an error).

    :param dm_plugins.context.DistillContext context: the same object passed to ``dm_setup``.

    Return value: ignored. Every registered implementation is called.
    """
