"""Wrapped networks: ``nn.DataParallel`` / ``DistributedDataParallel`` (``.module``) and
``torch.compile`` (``._orig_mod``) hold the real network inside; weights are read and written on
that inner network, and state-dict keys are compared without the wrappers' prefixes."""
from __future__ import annotations

from torch import nn

WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap_network(network: nn.Module) -> nn.Module:
    """The innermost network of any stack of DataParallel/DDP/compile wrappers."""
    while True:
        inner = getattr(network, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            network = inner
            continue
        inner = getattr(network, "module", None)
        if isinstance(inner, nn.Module) and isinstance(
                network, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            network = inner
            continue
        return network


def strip_wrapper_prefixes(state: dict) -> dict:
    """A state dict with the wrappers' key prefixes (``module.``, ``_orig_mod.``) removed."""
    def clean(key: str) -> str:
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        return key
    return {clean(k): v for k, v in state.items()}
