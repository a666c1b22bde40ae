"""Deterministic seeds and generators derived from (run seed, iteration, stream).

Every random draw of a run comes from a ``torch.Generator`` seeded by :func:`derive_seed`, never
from the wall clock or an unseeded global RNG. Deriving per-iteration seeds (instead of carrying
generator state along) makes a resumed run draw exactly what an uninterrupted one would.
"""
from __future__ import annotations

import contextlib
import random
from typing import Iterator

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


@contextlib.contextmanager
def preserved_global_rng() -> Iterator[None]:
    """Restore every global RNG a network factory might touch on exit: torch's CPU generator,
    the CUDA generators (when CUDA is initialised), Python's ``random`` and NumPy's legacy global
    state. Library calls that build networks run inside it, so a caller's RNG stream is the same
    whether or not the library was called, even when a factory reseeds the global RNG itself."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if cuda else None
    py_state = random.getstate()
    try:
        import numpy
        np_state = numpy.random.get_state()
    except ImportError:  # pragma: no cover - numpy is a declared dependency
        numpy = np_state = None
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        random.setstate(py_state)
        if numpy is not None:
            numpy.random.set_state(np_state)


def seed_global_rng(seed: int, cuda: bool = False) -> None:
    """Seed torch's global CPU generator (and the CUDA ones when ``cuda``). Unlike
    ``torch.manual_seed`` it never queues a seed for a CUDA context that is not initialised."""
    torch.random.default_generator.manual_seed(seed)
    if cuda:
        torch.cuda.manual_seed_all(seed)


def reinitialize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-draw a network's weights in place, as a freshly constructed one would draw them.

    Calls ``reset_parameters()`` on every submodule that has it, with the global RNG seeded by
    ``seed`` inside :func:`preserved_global_rng` (PyTorch's default initialisers take no
    generator argument), so the caller's RNG state is untouched and the same seed gives the
    same weights.
    """
    with preserved_global_rng():
        seed_global_rng(seed, cuda=_cuda_device(module) is not None)
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
