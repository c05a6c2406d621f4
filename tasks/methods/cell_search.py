"""Inverted-file nearest-neighbour search over a memory bank, as matrix products per cell.

The bank is split into k-means cells (faiss's seeded k-means). A query looks into the
``probe`` cells whose centroids are nearest to it. faiss's IndexIVFFlat scans those cells
vector by vector, one query at a time, which on 2 cores was no faster than its exact
search (a single BLAS product over the whole bank). Here the queries of a whole batch are
grouped by cell instead: for every cell, one matrix product between the queries probing it
and the cell's vectors. The work is ``probe / lists`` of an exact search (plus the
centroids), still done by BLAS.

The cells are built once, from the bank, and saved beside it (``save``/``load``): a served
model does not run k-means again, and every copy of a model (the pyfunc, an export)
searches the same cells.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

CELLS_FILE = "cells.npz"


class CellIndex:
    """``lists`` k-means cells over ``bank`` (float32 (N, D)); ``search`` probes ``probe``."""

    def __init__(self, bank: np.ndarray, centroids: np.ndarray, order: np.ndarray,
                 offsets: np.ndarray, probe: int):
        self.bank = bank
        self.centroids = np.ascontiguousarray(centroids, np.float32)
        self.centroid_sq = (self.centroids.astype(np.float64) ** 2).sum(1).astype(np.float32)
        self.order = order.astype(np.int64)            # bank rows, grouped by cell
        self.offsets = offsets.astype(np.int64)        # cell c: order[offsets[c]:offsets[c+1]]
        self.probe = max(1, min(int(probe), len(self.centroids)))
        # Cell-major copies: each cell's vectors contiguous, and their squared norms.
        self.sorted_bank = np.ascontiguousarray(bank[self.order], np.float32)
        self.sorted_sq = (self.sorted_bank.astype(np.float64) ** 2).sum(1).astype(np.float32)

    @classmethod
    def build(cls, bank: np.ndarray, lists: int, probe: int, seed: int = 0) -> "CellIndex":
        """k-means cells over ``bank`` (``lists``: 0 for the square root of the bank size)."""
        bank = np.ascontiguousarray(bank, np.float32)
        lists = lists or max(1, int(round(np.sqrt(len(bank)))))
        lists = min(lists, len(bank))
        kmeans = faiss.Kmeans(bank.shape[1], lists, niter=20, seed=seed,
                              max_points_per_centroid=256)
        kmeans.train(bank)
        _, cell = kmeans.index.search(bank, 1)
        order = np.argsort(cell[:, 0], kind="stable")
        offsets = np.searchsorted(cell[order, 0], np.arange(lists + 1))
        return cls(bank, kmeans.centroids, order, offsets, probe)

    def save(self, directory: Path) -> None:
        np.savez(directory / CELLS_FILE, centroids=self.centroids, order=self.order,
                 offsets=self.offsets)

    @classmethod
    def load(cls, directory: Path, bank: np.ndarray, probe: int) -> "CellIndex | None":
        """The saved cells of this bank, or None when none were saved."""
        path = directory / CELLS_FILE
        if not path.is_file():
            return None
        with np.load(path) as saved:
            if len(saved["order"]) != len(bank):
                return None  # cells of another bank: built again
            return cls(np.ascontiguousarray(bank, np.float32), saved["centroids"],
                       saved["order"], saved["offsets"], probe)

    @property
    def lists(self) -> int:
        return len(self.centroids)

    def probed_cells(self, queries: np.ndarray) -> np.ndarray:
        """(n, probe) cells nearest to each query, by centroid distance."""
        # |q|^2 is the same for every centroid of a query: left out of the ranking.
        ranking = self.centroid_sq - 2.0 * (queries @ self.centroids.T)
        if self.probe >= self.lists:
            return np.broadcast_to(np.arange(self.lists), (len(queries), self.lists))
        return np.argpartition(ranking, self.probe - 1, axis=1)[:, :self.probe]

    def search(self, queries: np.ndarray) -> np.ndarray:
        """The bank row nearest to each query (n,) among the probed cells."""
        queries = np.ascontiguousarray(queries, np.float32)
        n = len(queries)
        cells = self.probed_cells(queries).ravel()
        owners = np.repeat(np.arange(n), self.probe)
        by_cell = np.argsort(cells, kind="stable")
        cells, owners = cells[by_cell], owners[by_cell]
        bounds = np.searchsorted(cells, np.arange(self.lists + 1))
        best = np.full(n, np.inf, np.float32)
        nearest = np.zeros(n, np.int64)
        for cell in np.flatnonzero(np.diff(bounds)):
            start, stop = self.offsets[cell], self.offsets[cell + 1]
            if start == stop:
                continue
            who = owners[bounds[cell]:bounds[cell + 1]]
            # |q - m|^2 - |q|^2: the query's own norm does not change its ranking.
            dist = self.sorted_sq[start:stop] - 2.0 * (queries[who] @ self.sorted_bank[start:stop].T)
            local = dist.argmin(axis=1)
            value = dist[np.arange(len(who)), local]
            better = value < best[who]
            best[who[better]] = value[better]
            nearest[who[better]] = start + local[better]
        return self.order[nearest]
