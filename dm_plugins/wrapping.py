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


class FrozenModule(nn.Module):
    """Holds a network as ``.module`` and forwards to it: what a DistributedDataParallel-wrapped
    network looks like to code that calls ``net.module.embed``, for a network whose parameters
    need no gradient (DistributedDataParallel refuses such a network)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def wrap_like(template: nn.Module | None, network: nn.Module) -> nn.Module:
    """``network`` in the same stack of wrappers as ``template`` (the user's own network):
    ``nn.DataParallel`` with the template's devices, ``torch.compile``, and for
    DistributedDataParallel a :class:`FrozenModule` (so ``net.module`` works either way). The
    wrappers share ``network``'s parameters, so writing them in place reaches every layer.
    ``template`` None or unwrapped: ``network`` itself."""
    layers = []
    while template is not None:
        if isinstance(getattr(template, "_orig_mod", None), nn.Module):
            layers.append(("compile", None))
            template = template._orig_mod
        elif isinstance(template, nn.DataParallel):
            layers.append(("dp", template))
            template = template.module
        elif isinstance(template, nn.parallel.DistributedDataParallel):
            layers.append(("ddp", None))
            template = template.module
        else:
            break
    for kind, source in reversed(layers):
        if kind == "compile":
            import torch
            network = torch.compile(network)
        elif kind == "dp":
            # on a machine without GPUs DataParallel keeps no devices (it calls the module)
            network = nn.DataParallel(network, device_ids=getattr(source, "device_ids", None) or
                                      None, output_device=getattr(source, "output_device", None),
                                      dim=getattr(source, "dim", 0))
        else:
            network = FrozenModule(network)
    return network
