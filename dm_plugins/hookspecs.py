"""Hook specifications of dm_plugins (pluggy project name ``"dm_plugins"``).

A DM-style loop (the minimal host in :mod:`dm_plugins.loop`, an adapter in ``adapters/``, or a
user's own fork of DM, IDM or DANCE) calls these hooks at fixed points of every distillation
iteration, always through :class:`dm_plugins.PluginSet` and always with keyword arguments. A
plugin is any object with methods of these names decorated by :data:`hookimpl`; it may implement
any subset, and pluggy passes an implementation only the arguments it names.

One iteration ``t`` of a loop, in order::

    dm_provide_extractor(...)         # at most one plugin: the network for iteration t
    (loop computes real and synthetic features with that network, or with its own)
    dm_select_real(...)               # per class: which real samples to match
    (loop computes the matching loss)
    dm_feature_loss(...)              # per class: extra named losses on the features
    dm_auxiliary_loss(...)            # extra named losses on the synthetic images
    (loop steps the synthetic images on matching + auxiliary losses)

``dm_setup`` runs once before the first iteration and ``dm_teardown`` once after the last.
Iterations are numbered ``t = 0 .. T-1`` with ``T = num_iterations`` (a loop that runs past T
gets a warning once and its hooks see ``t = T`` from then on); the method notes in
``docs/methods.md`` give the equations cited below.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:  # annotations only
    import torch
    from torch import nn

    from .context import DistillContext

PROJECT_NAME = "dm_plugins"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def dm_setup(context: "DistillContext") -> None:
    """Prepare a plugin for a distillation run.

    Called once, before the first iteration and before any other hook.

    :param context: what the run is (see :class:`dm_plugins.DistillContext`): ``num_classes``,
        ``ipc`` (stored images per class, the budget), ``num_iterations`` (T), ``device``,
        ``memory_format``, ``seed``, and optionally ``real`` (class-indexed real data,
        normalised) and ``extractor`` (the loop's own network, for compatibility checks only).

    Validate that the plugin fits the run (raise :class:`dm_plugins.PluginError` with a one-line
    message if not), move state to ``context.device`` and build what does not change during the
    run. A plugin that needs an optional field the loop did not give raises ``PluginError``.

    Return value: ignored. Every registered implementation is called.
    """


@hookspec(firstresult=True)
def dm_provide_extractor(iteration: int, num_iterations: int) -> "nn.Module | None":
    """Provide the feature extractor for iteration ``iteration``.

    Called at the start of every iteration, before any feature is computed, through
    :meth:`dm_plugins.PluginSet.extractor`.

    :param iteration: t, in ``0 .. num_iterations - 1``.
    :param num_iterations: T.

    Return value: a network the *plugin owns* (built from its own weights; it may rewrite that
    network in place from one iteration to the next), or ``None`` to leave the choice to the
    loop. A provider never modifies a network of the loop or of the method (a fresh random
    net, IDM's queue models, DANCE's experts). The returned network is in training mode with
    ``requires_grad`` off for its parameters, on ``context.device`` in ``context.memory_format``.

    At most one registered plugin may implement this hook: registering a second one is a
    :class:`dm_plugins.PluginError` naming both (the marker is ``firstresult``; there is never a
    second result to combine). With no provider, or when it returns ``None``, the loop's own
    policy applies (DM: a fresh random network; IDM: a network from its queue; DANCE: an expert
    mixed with its initialisation by a random ratio).
    """


@hookspec
def dm_select_real(label: int, real_features: "torch.Tensor", syn_features: "torch.Tensor",
                   iteration: int, num_iterations: int) -> "torch.Tensor | None":
    """Choose which real samples of one class the matching loss uses.

    Called once per class per iteration, after features are computed and before the matching
    loss; reuse the features, never run the extractor again.

    :param label: the class c.
    :param real_features: (B, D) features of the class's (augmented) real batch, no graph.
    :param syn_features: (S, D) features of the class's (decoded, augmented) synthetic images.
        They carry the images' graph: detach before using them.
    :param iteration: t.
    :param num_iterations: T.

    Return value: a boolean keep-mask of shape (B,), or ``None`` to keep every sample. All
    implementations are called; the masks are ANDed. Each implementation keeps at least one
    sample on its own; if the AND of several masks keeps nothing, the whole batch is kept (a
    mean over no samples is undefined).
    """


@hookspec
def dm_auxiliary_loss(syn_images: "torch.Tensor", syn_labels: "torch.Tensor", iteration: int,
                      num_iterations: int, extractor: "nn.Module | None",
                      real_images: "torch.Tensor | None", real_labels: "torch.Tensor | None"
                      ) -> "dict[str, torch.Tensor] | None":
    """Return extra losses on the synthetic images, added to the matching loss (Eq. 10).

    Called after the matching loss is built and before the backward pass: once per iteration
    with every class's images, or once per class in a per-class loop (the losses are sums over
    classes of per-class means, so the per-class calls add up to the single call). A host that
    offers a separate step (``"separate_step"`` in :attr:`DistillContext.offers`) calls it there
    instead when a plugin asks for one (see :attr:`dm_plugins.PluginSet.separate_step_lr`).

    :param syn_images: (N, C, H, W) the synthetic images exactly as the extractor saw them in
        this iteration: decoded (factorisation), normalised and augmented with the same draw as
        the matching step, carrying their graph to the stored images.
    :param syn_labels: (N,) their class labels (long).
    :param iteration: t.
    :param num_iterations: T.
    :param extractor: the host's matching network of iteration t, when the host offers
        ``"extractor"``; else None.
    :param real_images: the real batch of the classes in ``syn_labels``, augmented with the same
        draw as ``syn_images``, no graph, when the host offers ``"real_batch"``; else None.
    :param real_labels: their labels, or None.

    Return value: a dict of named scalar losses connected to ``syn_images``'s graph (e.g.
    ``{"plm": loss}``), or ``None`` for none this iteration. All implementations are called;
    the dicts are merged (a name returned by two plugins is a ``PluginError``) and the sum of
    all values is added to the matching loss with weight 1. Names are logged as ``loss_<name>``.
    Sum a loss over classes of per-class means, like the DM loss, so that its weight does not
    depend on how many classes a loop batches together.
    """


@hookspec
def dm_feature_loss(label: int, real_features: "torch.Tensor", syn_features: "torch.Tensor",
                    iteration: int, num_iterations: int) -> "dict[str, torch.Tensor] | None":
    """Return extra losses on one class's features, added to the matching loss.

    Called once per class per iteration, right where the host computes the class's matching
    loss, after ``dm_select_real``; reuse the features, never run the extractor again (IID's
    covariance matching, for example, costs no extra forward this way). A loop that batches
    every class in one forward calls it per class through
    :meth:`dm_plugins.PluginSet.batched_feature_losses`.

    :param label: the class c.
    :param real_features: (B, D) features of the class's (augmented) real samples that the
        matching loss uses (the rows ``dm_select_real`` kept), no graph.
    :param syn_features: (S, D) features of the class's (decoded, augmented) synthetic images,
        carrying their graph to the stored images.
    :param iteration: t.
    :param num_iterations: T.

    The features are the flattened output of the extractor's ``embed`` (for a ConvNet, its last
    feature map, C x H x W flattened channel-major), as the matching loss uses them.

    Return value: a dict of named scalar losses connected to ``syn_features``'s graph, or
    ``None``. All implementations are called; the dicts are merged as for
    ``dm_auxiliary_loss`` (a name returned twice, here or there, is a ``PluginError``), each
    name summed over classes by the host and added to the matching loss with weight 1; names
    are logged as ``loss_<name>``.
    """


@hookspec
def dm_teardown(context: "DistillContext") -> None:
    """Release what :func:`dm_setup` built.

    Called once after the last iteration (also when the run stops with an error).

    :param context: the object passed to ``dm_setup``.

    Return value: ignored. Every registered implementation is called.
    """
