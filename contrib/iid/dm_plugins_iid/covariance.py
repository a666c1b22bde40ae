"""IID's covariance matching L_CM (Deng et al., CVPR 2024): plugin ``iid-cm``, a feature loss."""
from __future__ import annotations

import torch

from dm_plugins import PluginError, PluginOption, hookimpl


def non_negative(value: float) -> str | None:
    """A :class:`dm_plugins.PluginOption` check: None when ``value >= 0``, else what is wrong."""
    return None if value >= 0 else "must be >= 0"


def positive_int(value: int) -> str | None:
    """A :class:`dm_plugins.PluginOption` check: None when ``value >= 1``, else what is wrong."""
    return None if value >= 1 else "must be >= 1"


def channel_maps(features: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, D) flattened feature maps -> (N, C, D // C): row i is F_i, sample i's last feature
    map as a C x HW matrix (the hosts flatten a (C, H, W) map channel-major, so a reshape
    undoes it). Computed in at least float32 (half-precision features are promoted).

    A :class:`PluginError` (one line) when ``features`` is not 2-D or D is not a multiple of C.
    """
    if features.ndim != 2:
        raise PluginError(f"iid-cm: features must be (batch, D), got {tuple(features.shape)}")
    n, dim = features.shape
    if dim % channels:
        raise PluginError(f"iid-cm: the features have D = {dim} dimensions, which "
                          f"--iid-cm-channels {channels} does not divide; set it to the channel "
                          f"count of the extractor's last feature map")
    maps = features.reshape(n, channels, dim // channels)
    return maps.to(torch.promote_types(maps.dtype, torch.float32))


def local_covariance(features: torch.Tensor, channels: int) -> torch.Tensor:
    """The paper's local feature covariance of one class's batch, a C x C matrix::

        Sigma = (1/N) sum_i (F_i - Fbar)(F_i - Fbar)^T,   Fbar = (1/N) sum_i F_i

    with F_i the C x HW map of :func:`channel_maps`: the covariance of the C channels over the
    HW positions of every sample, centred on the batch's mean map (divided by N, not N - 1, as
    in the public code). With N = 1 it is exactly the zero matrix (F_1 = Fbar).
    """
    maps = channel_maps(features, channels)
    centred = maps - maps.mean(dim=0, keepdim=True)
    flat = centred.transpose(0, 1).reshape(channels, -1)  # (C, N * HW)
    return flat @ flat.T / maps.shape[0]


def covariance_matching_loss(real_features: torch.Tensor, syn_features: torch.Tensor,
                             channels: int, weight: float) -> torch.Tensor:
    """L_CM of one class: ``weight * ||Sigma_real - Sigma_syn||_F^2`` (:func:`local_covariance`
    of the class's real and of its synthetic features; a host sums it over classes).

    ``real_features`` are detached here: the gradient reaches the synthetic features only.

    At IPC 1 (one synthetic feature row, S = 1), Sigma_syn is exactly 0, so the loss is the
    constant ``weight * ||Sigma_real||_F^2`` and its gradient with respect to the synthetic
    features is exactly zero: the term is logged but moves nothing. It acts only when a class
    has S >= 2 synthetic rows (IPC >= 2, or several decoded or augmented images per stored
    one, e.g. factorisation).
    """
    if real_features.shape[1:] != syn_features.shape[1:]:
        raise PluginError(f"iid-cm: real features have shape {tuple(real_features.shape)} but "
                          f"synthetic {tuple(syn_features.shape)}; they need the same D")
    sigma_real = local_covariance(real_features.detach(), channels)
    sigma_syn = local_covariance(syn_features, channels)
    return weight * (sigma_real - sigma_syn).pow(2).sum()


class CovarianceMatching:
    """Plugin ``iid-cm``: match each class's local feature covariance (the paper's L_CM).

    Per class and iteration, on the features the host already computed for its matching loss
    (hook ``dm_feature_loss``; no extra forward): the real features after ``dm_select_real``
    and the synthetic ones with their graph, each (N, D) row sample i's last feature map
    flattened channel-major, F_i = row.reshape(C, D // C). It returns
    ``{"iid_cm": weight * ||Sigma_real - Sigma_syn||_F^2}`` (:func:`covariance_matching_loss`);
    the host sums it over classes and adds it to the matching loss, which is the paper's
    ``lambda_CM * L_CM`` with ``lambda_CM = weight``.

    At IPC 1 the term is a constant with zero gradient (see :func:`covariance_matching_loss`).

    Args:
        weight: lambda_CM, >= 0 (the public DM code: 0.01; the public IDM code: 0.03).
        channels: C, the channel count of the extractor's last feature map (128, the ConvNet
            width); D must be a multiple of it.
    """

    name = "iid-cm"
    needs_experts = False
    options = (
        PluginOption("weight", float, 0.01, "lambda_CM, the weight of the covariance matching "
                     "loss (public DM code 0.01; public IDM code 0.03)", check=non_negative),
        PluginOption("channels", int, 128, "channels C of the extractor's last feature map "
                     "(the ConvNet width, 128); the feature dimension must be a multiple of it",
                     check=positive_int),
    )

    def __init__(self, weight: float = 0.01, channels: int = 128):
        for option, value in zip(self.options, (weight, channels)):
            problem = option.problem(value)
            if problem:
                raise PluginError(f"iid-cm's {option.name} {problem}, got {value!r}")
        self.weight = float(weight)
        self.channels = int(channels)

    @hookimpl
    def dm_feature_loss(self, label, real_features, syn_features):
        if real_features.shape[0] == 0 or syn_features.shape[0] == 0:
            raise PluginError(f"iid-cm: class {label} has {real_features.shape[0]} real and "
                              f"{syn_features.shape[0]} synthetic feature rows; it needs both")
        return {"iid_cm": covariance_matching_loss(real_features, syn_features, self.channels,
                                                   self.weight)}

    def __repr__(self) -> str:
        return f"CovarianceMatching(weight={self.weight}, channels={self.channels})"
