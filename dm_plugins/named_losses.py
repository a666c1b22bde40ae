"""Named losses from several sources in one dict: what a host adds to its loss and logs.

Contract: :func:`merge_losses` keeps every name once; a name two sources return (a plugin's
``dm_feature_loss`` and another's ``dm_auxiliary_loss``, or a method's own loss and a plugin's)
is a :class:`~dm_plugins.errors.PluginError`, since summing them silently would log one number
for two losses. Values are whatever the sources hold (tensors with graph, or floats).
"""
from __future__ import annotations

from typing import Any

from .errors import PluginError

__all__ = ["merge_losses"]


def merge_losses(*parts: dict[str, Any]) -> dict[str, Any]:
    """The named losses of ``parts`` in one dict, in order; a repeated name is a
    PluginError."""
    merged: dict[str, Any] = {}
    for part in parts:
        for name, loss in part.items():
            if name in merged:
                raise PluginError(f"two sources return a loss named {name!r}")
            merged[name] = loss
    return merged
