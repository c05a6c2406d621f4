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
import torch

CELLS_FILE = "cells.npz"
# Queries ranked against the centroids per block: the (block, lists) ranking stays a few MB
# that the allocator reuses, where a whole batch's ranking took hundreds of MB of fresh
# memory (first touches of fresh pages cost more than the products on this machine).
QUERY_BLOCK = 8192


class CellIndex:
    """``lists`` k-means cells over ``bank`` (float32 (N, D)); ``search`` probes ``probe``."""

    def __init__(self, bank: np.ndarray, centroids: np.ndarray, order: np.ndarray,
                 offsets: np.ndarray, probe: int):
        self.bank = bank
        self.centroids = np.ascontiguousarray(centroids, np.float32)
        self.order = order.astype(np.int64)            # bank rows, grouped by cell
        self.offsets = offsets.astype(np.int64)        # cell c: order[offsets[c]:offsets[c+1]]
        self.probe = max(1, min(int(probe), len(self.centroids)))
        # Cell-major bank, transposed (each cell a contiguous block of columns), and the
        # squared norms, as torch tensors for fused products (addmm) and reductions.
        sorted_bank = np.ascontiguousarray(bank[self.order], np.float32)
        self._sorted_t = torch.from_numpy(np.ascontiguousarray(sorted_bank.T))
        self._sorted_sq = torch.from_numpy(
            (sorted_bank.astype(np.float64) ** 2).sum(1).astype(np.float32))

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

    def probed_cells(self, queries: torch.Tensor) -> torch.Tensor:
        """(n, probe) cells nearest to each query, by centroid distance: faiss's k-nearest
        search over the centroids, in blocks (the same cells as a product and torch's topk,
        measured, and 25% faster: /work/exp/ov10/cells_parts.py)."""
        if self.probe >= self.lists:
            return torch.arange(self.lists).expand(len(queries), self.lists)
        cells = np.empty((len(queries), self.probe), dtype=np.int64)
        flat = queries.numpy()
        for start in range(0, len(queries), QUERY_BLOCK):
            block = slice(start, start + QUERY_BLOCK)
            cells[block] = faiss.knn(flat[block], self.centroids, self.probe)[1]
        return torch.from_numpy(cells)

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """faiss's ``search`` for ``k`` = 1: (squared distances (n, 1), bank rows (n, 1)) of
        the bank vector nearest to each query among the probed cells."""
        if k != 1:
            raise ValueError(f"the cell search finds the nearest vector only (k=1), not k={k}")
        queries = torch.from_numpy(np.ascontiguousarray(queries, np.float32))
        n = len(queries)
        cells = self.probed_cells(queries).reshape(-1)
        owners = torch.arange(n).repeat_interleave(self.probe)
        cells, by_cell = torch.sort(cells, stable=True)
        owners = owners[by_cell]
        bounds = torch.searchsorted(cells, torch.arange(self.lists + 1)).tolist()
        best = torch.full((n,), float("inf"))
        nearest = torch.zeros(n, dtype=torch.int64)
        for cell in range(self.lists):
            start, stop = int(self.offsets[cell]), int(self.offsets[cell + 1])
            if bounds[cell] == bounds[cell + 1] or start == stop:
                continue
            who = owners[bounds[cell]:bounds[cell + 1]]
            # |q - m|^2 - |q|^2 (the query's own norm does not change its ranking), and its
            # minimum over the cell, in one product and one reduction.
            dist = torch.addmm(self._sorted_sq[start:stop], queries.index_select(0, who),
                               self._sorted_t[:, start:stop], alpha=-2.0)
            value, local = dist.min(dim=1)
            better = value < best[who]
            who = who[better]
            best[who] = value[better]
            nearest[who] = local[better] + start
        for start in range(0, n, QUERY_BLOCK):
            block = queries[start:start + QUERY_BLOCK]
            best[start:start + QUERY_BLOCK] += (block * block).sum(1)
        return best.clamp_min(0).numpy()[:, None], self.order[nearest.numpy()][:, None]
