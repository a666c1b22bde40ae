"""Greedy coreset selection on feature vectors (one class at a time): herding and k-center.

Both are pure functions of ``features`` (n, d) and ``k``: no randomness, ties go to the lowest
index, distances are Euclidean and computed in float64. They return the indices of the chosen
rows in the order they were chosen (a LongTensor of length ``k``; ``k = n`` gives a permutation
of ``range(n)``). ``k`` must be in ``[0, n]``; anything else is a ``ValueError``.
"""
from __future__ import annotations

import torch


def _check(features: torch.Tensor, k: int) -> torch.Tensor:
    if features.ndim != 2:
        raise ValueError(f"features must be (n, d), got shape {tuple(features.shape)}")
    n = features.shape[0]
    if not 0 <= k <= n:
        raise ValueError(f"cannot choose k={k} of {n} samples; k must be in [0, {n}]")
    return features.detach().to("cpu", torch.float64)


def herding(features: torch.Tensor, k: int) -> torch.Tensor:
    """Herding (Welling 2009, as in the DC benchmark): ``k`` rows chosen greedily, without
    replacement, so that the running mean of the chosen rows stays closest to the mean of all
    rows.

    Step i (0-based) picks the unchosen row x minimising ``|| mu - (s + x) / (i + 1) ||``,
    where ``mu`` is the mean of all rows and ``s`` the sum of the rows chosen so far; the first
    pick is thus the row closest to ``mu``.
    """
    x = _check(features, k)
    mu = x.mean(0)
    chosen: list[int] = []
    available = torch.ones(x.shape[0], dtype=torch.bool)
    total = torch.zeros_like(mu)
    for i in range(k):
        dist = ((total + x) / (i + 1) - mu).norm(dim=1)
        dist[~available] = float("inf")
        j = int(torch.argmin(dist))             # argmin returns the first minimum: lowest index
        chosen.append(j)
        available[j] = False
        total += x[j]
    return torch.tensor(chosen, dtype=torch.long)


def k_center(features: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy k-center (farthest-point traversal, Sener & Savarese 2018): the first pick is the
    row closest to the mean of all rows; each later pick is the unchosen row farthest from its
    nearest chosen row (max over rows of the min distance to the chosen set)."""
    x = _check(features, k)
    if k == 0:
        return torch.zeros(0, dtype=torch.long)
    first = int(torch.argmin((x - x.mean(0)).norm(dim=1)))
    chosen = [first]
    nearest = (x - x[first]).norm(dim=1)         # distance of each row to its nearest chosen row
    nearest[first] = -1.0                        # chosen rows are never picked again
    for _ in range(k - 1):
        j = int(torch.argmax(nearest))           # argmax returns the first maximum: lowest index
        chosen.append(j)
        nearest = torch.minimum(nearest, (x - x[j]).norm(dim=1))
        nearest[chosen] = -1.0
    return torch.tensor(chosen, dtype=torch.long)


SELECTORS = {"herding": herding, "kcenter": k_center}
"""The selection rules by ``baselines/coreset.py --method`` name."""
