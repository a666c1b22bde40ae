"""Deterministic seeds and generators derived from (run seed, iteration, stream).

Every random draw of a run comes from a ``torch.Generator`` seeded by :func:`derive_seed`, never
from the wall clock or an unseeded global RNG. Deriving per-iteration seeds (instead of carrying
generator state along) makes a resumed run draw exactly what an uninterrupted one would.
"""
from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part and their order (splitmix64 chain).

    Stable across Python, NumPy and PyTorch versions: it is plain integer arithmetic.
    """
    h = 0x5EED
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h & ((1 << 63) - 1)


def make_generator(*parts: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``derive_seed(*parts)``."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*parts))
    return g


def reinitialize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-draw a network's weights in place, as a freshly constructed one would draw them.

    Calls ``reset_parameters()`` on every submodule that has it, with the global CPU RNG forked
    and seeded by ``seed`` (PyTorch's default initialisers take no generator argument), so the
    caller's RNG state is untouched and the same seed gives the same weights.
    """
    devices = [module_device] if (module_device := _cuda_device(module)) is not None else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for m in module.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
    return module


def _cuda_device(module: torch.nn.Module):
    for p in module.parameters():
        if p.is_cuda:
            return p.device
    return None
