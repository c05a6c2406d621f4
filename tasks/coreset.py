"""Greedy k-center coreset selection (Sener & Savarese 2018, as used by PatchCore).

Distances are computed on a sparse random projection of the features
(Johnson-Lindenstrauss), which keeps pairwise distances while making every
greedy step cheap. The bank is processed in chunks of at most ``chunk_size``
vectors, each reduced by the same ratio: the cost is then
``ratio * N * chunk_size * d`` (linear in N) instead of the plain greedy
``ratio * N^2 * d``, and memory stays bounded by one chunk. With
``N <= chunk_size`` it is exactly the plain greedy coreset.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def random_projection(dim_in: int, dim_out: int, seed: int = 0) -> np.ndarray:
    """Gaussian JL projection matrix (dim_in, dim_out); identity when no reduction is needed."""
    if dim_out >= dim_in:
        return np.eye(dim_in, dtype=np.float32)
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((dim_in, dim_out)) / math.sqrt(dim_out)).astype(np.float32)


def _greedy(points: torch.Tensor, count: int, start: int) -> np.ndarray:
    """Plain greedy k-center on one chunk: each step adds the point farthest from the set."""
    sq_norms = (points * points).sum(dim=1)
    selected = np.empty(count, dtype=np.int64)
    nearest = torch.full((points.shape[0],), float("inf"))
    index = start
    for step in range(count):
        selected[step] = index
        center = points[index]
        # ||p - c||^2 = ||p||^2 - 2 p.c + ||c||^2, one matrix-vector product per step.
        dist = sq_norms - 2.0 * (points @ center) + sq_norms[index]
        torch.minimum(nearest, dist, out=nearest)
        index = int(torch.argmax(nearest))
    return selected


def greedy_coreset(features: np.ndarray, ratio: float, projection_dim: int = 128,
                   chunk_size: int = 16384, seed: int = 0) -> np.ndarray:
    """Indices (sorted) of a coreset with about ``ratio * N`` rows of ``features`` (N, D)."""
    total = features.shape[0]
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    if ratio >= 1.0:
        return np.arange(total)
    projection = torch.from_numpy(random_projection(features.shape[1], projection_dim, seed))
    rng = np.random.default_rng(seed)
    chunks = max(1, math.ceil(total / chunk_size))
    bounds = np.linspace(0, total, chunks + 1).astype(np.int64)
    picked = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        points = torch.from_numpy(np.asarray(features[lo:hi], dtype=np.float32)) @ projection
        count = max(1, int(round(ratio * (hi - lo))))
        start = int(rng.integers(hi - lo))
        picked.append(_greedy(points, count, start) + lo)
    return np.sort(np.concatenate(picked))
