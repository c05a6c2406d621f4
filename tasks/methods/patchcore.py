"""PatchCore (Roth et al., CVPR 2022), as in the kitchen-board thesis sections 4.1 and 5.3.

Locally aware patch features from two backbone layers (3x3 neighbourhood
average, the deeper layer upsampled bilinearly to the shallower one's grid,
concatenated) form a memory bank of normal features, reduced by a greedy
coreset. A test patch's score is its distance to the nearest bank feature;
the image score is the largest patch score, reweighted by how isolated that
bank feature is among its own neighbours (paper, eq. 7).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from ..coreset import StreamingCoreset
from .base import FeatureDetector, PatchSet
from .cell_search import QUERY_BLOCK, CellIndex
from .flat_search import TorchFlatIndex
from .torch_heads import MapPost, PatchCoreHead, PatchEmbedHead, upsample_and_smooth


#: The 3x3 average at the map border: counting the zero padding, or the cells inside only.
BORDER_POOLINGS = ("zero_padded", "valid")


@dataclass(frozen=True)
class PatchCoreParams:
    layers: tuple[str, ...] = ("blocks.2", "blocks.4")
    coreset_ratio: float = 0.1
    projection_dim: int = 128          # JL projection used by the coreset selection only
    coreset_chunk: int = 16384         # vectors per greedy chunk: bounds memory, time linear in N
    # Chunks keep oversample x ratio, then one greedy pass over all kept picks ratio x N (when
    # oversample x ratio <= 0.1): close to a whole-bank greedy at small ratios. 1: per chunk only.
    coreset_oversample: int = 4
    # Second stage: candidates reduced together. Bigger is closer to a whole-bank greedy; each
    # reduction costs pool^2 / oversample distance evaluations, so time grows faster than N
    # until the candidates fill one pool, linearly beyond.
    coreset_pool: int = 65536
    num_neighbors: int = 9             # b in the paper's image-score reweighting
    # 3x3 average at the map border: "zero_padded" counts the zero padding, as the reference
    # code and anomalib do; "valid" averages only the cells inside the map. zero_padded measured
    # +2 image / +8 pixel AUROC points on 100 train images of Magnetic Tile at 256 px.
    border_pooling: str = "zero_padded"
    smoothing_sigma: float = 4.0       # Gaussian blur of the upsampled anomaly map
    # "exact" (faiss flat L2; on a GPU, matrix products there), "hnsw" (graph, for banks of
    # millions) or "ivf" (inverted lists: each query scans ivf_probe of the bank's ivf_lists
    # k-means cells, cell_search.py).
    search: str = "exact"
    hnsw_neighbors: int = 32           # HNSW graph degree (M)
    hnsw_ef_search: int = 128          # HNSW search breadth: higher is closer to exact, slower
    ivf_lists: int = 0                 # k-means cells; 0: the square root of the bank size
    ivf_probe: int = 8                 # cells scanned per query: higher is closer to exact
    # Approximate searches only: each image's exact_top highest patch scores are searched
    # again exactly, so the image score (the worst patch, reweighted) is the exact one unless
    # the worst patch ranks below exact_top by its approximate distance. 0: none.
    exact_top: int = 8
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        if not 0 < self.coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if (self.num_neighbors < 1 or self.projection_dim < 1 or self.coreset_chunk < 2
                or self.coreset_oversample < 1 or self.coreset_pool < 2):
            raise ValueError("num_neighbors, projection_dim, coreset_chunk, coreset_oversample "
                             "and coreset_pool must be positive")
        if self.search not in ("exact", "hnsw", "ivf"):
            raise ValueError(f"search must be 'exact', 'hnsw' or 'ivf', got {self.search!r}")
        if self.ivf_lists < 0 or self.ivf_probe < 1 or self.exact_top < 0:
            raise ValueError("ivf_lists and exact_top must be >= 0 and ivf_probe >= 1")
        check_border_pooling(self.border_pooling)
        if self.smoothing_sigma < 0:
            raise ValueError(f"smoothing_sigma must be >= 0, got {self.smoothing_sigma}")


def check_border_pooling(value: str) -> None:
    """``border_pooling`` is one of :data:`BORDER_POOLINGS` (PatchCore's and the ensemble's)."""
    if value not in BORDER_POOLINGS:
        raise ValueError(f"border_pooling must be {' or '.join(map(repr, BORDER_POOLINGS))}, "
                         f"got {value!r}")


def embed(feature_maps: dict[str, np.ndarray], layers,
          border_pooling: str = "valid") -> torch.Tensor:
    """(n, h, w, D) locally aware features on the grid of the first (shallowest) layer.

    ``border_pooling`` as in :class:`PatchCoreParams`; the default "valid" is what the
    ensemble method was tuned with.
    """
    first = torch.from_numpy(feature_maps[layers[0]])
    grid = first.shape[-2:]
    parts = []
    for layer in layers:
        fmap = torch.from_numpy(feature_maps[layer])
        fmap = F.avg_pool2d(fmap, kernel_size=3, stride=1, padding=1,
                            count_include_pad=border_pooling == "zero_padded")
        if fmap.shape[-2:] != grid:
            fmap = F.interpolate(fmap, size=grid, mode="bilinear", align_corners=False)
        parts.append(fmap)
    return torch.cat(parts, dim=1).permute(0, 2, 3, 1).contiguous()


class PatchCore(FeatureDetector):
    name = "patchcore"
    Params = PatchCoreParams

    def __init__(self, params: PatchCoreParams | None = None):
        super().__init__(params)
        self.memory_bank: np.ndarray | None = None
        self._index: faiss.Index | None = None
        self._exact: faiss.Index | None = None
        self._cells: CellIndex | None = None
        self._search_device = "cpu"  # where the exact search runs: the scored features' device

    # -- fitting ---------------------------------------------------------------
    def fit(self, train: PatchSet) -> "PatchCore":
        # The bank streams through the chunked coreset as it is embedded: memory holds one
        # chunk plus the selected rows, never the whole bank (issue: 146M vectors at stride 112).
        # The greedy steps run where the features were computed (train.device: "cpu" or "cuda").
        started = time.perf_counter()
        coreset = StreamingCoreset(self.params.coreset_ratio, self.params.projection_dim,
                                   self.params.coreset_chunk, self.params.seed, device=train.device,
                                   oversample=self.params.coreset_oversample,
                                   pool=self.params.coreset_pool)
        for _, maps in train.feature_chunks(self.params.layers, chunk_size=64):
            feats = embed(maps, self.params.layers, self.params.border_pooling)
            coreset.add(feats.reshape(-1, feats.shape[-1]).numpy())
        self.memory_bank = coreset.finish()
        self.bank_vectors_seen = coreset.seen
        # Where fit time went (seconds), for benchmarks; not part of the saved state.
        self.fit_seconds = {"coreset": coreset.seconds,
                            "total": time.perf_counter() - started}
        self._index = self._exact = self._cells = None
        return self

    @property
    def index(self):
        """The configured search over the bank (faiss's ``search(queries, k)`` interface):
        the exact index, faiss's HNSW graph, or the k-means cells ("ivf", k = 1 only; an ivf
        model's cells come saved with it)."""
        if self.params.search == "ivf":
            lists = self.params.ivf_lists
            if self._cells is None or (lists and lists != self._cells.lists):
                self._cells = CellIndex.build(self.memory_bank, lists, self.params.ivf_probe,
                                              self.params.seed)
            self._cells.probe = max(1, min(self.params.ivf_probe, self._cells.lists))
            return self._cells
        if self._index is None:
            if self.params.search == "hnsw":
                # Graph search: sub-linear in the bank, for banks of millions of vectors.
                self._index = faiss.IndexHNSWFlat(self.memory_bank.shape[1],
                                                  self.params.hnsw_neighbors)
                self._index.hnsw.efSearch = self.params.hnsw_ef_search
                self._index.add(self.memory_bank)
            else:
                self._index = self.exact_index
        return self._index

    @property
    def exact_index(self) -> faiss.Index | TorchFlatIndex:
        """The flat (exact) index over the bank: faiss's for the exact search on the CPU;
        torch products on a GPU, and for the few queries an approximate search hands
        back (measured 4x faster than faiss's flat index for a few hundred queries)."""
        if self._exact is None:
            if self._search_device == "cpu" and self.params.search != "ivf":
                self._exact = faiss.IndexFlatL2(self.memory_bank.shape[1])
                self._exact.add(self.memory_bank)
            else:
                self._exact = TorchFlatIndex(self.memory_bank, self._search_device)
        return self._exact

    def _search_on(self, device: str) -> None:
        """Exact searches from now on run on ``device`` (indexes are rebuilt on a change)."""
        if device != self._search_device:
            self._search_device = device
            self._exact = None
            if self.params.search == "exact":
                self._index = None

    def _exact_neighbours(self, queries: np.ndarray, k: int = 1) -> np.ndarray:
        """The ``k`` nearest bank rows of each query (n, k), searched exactly."""
        return self.exact_index.search(queries, k)[1]

    def _nearest(self, queries: np.ndarray) -> np.ndarray:
        """The bank row found nearest to each query (n,), by the configured search."""
        return self.index.search(queries, 1)[1][:, 0]

    # -- scoring ---------------------------------------------------------------
    def score(self, batch: PatchSet) -> tuple[np.ndarray, np.ndarray]:
        size = batch.input_size
        scores = np.zeros(len(batch), dtype=np.float32)
        anomaly_maps = np.zeros((len(batch), size, size), dtype=np.float32)
        self._search_on(batch.device)
        for part, maps in batch.feature_chunks(self.params.layers):
            feats = embed(maps, self.params.layers, self.params.border_pooling)
            scores[part], anomaly_maps[part] = self.score_embedded(feats.numpy(), size)
        return scores, anomaly_maps

    def score_embedded(self, feats: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Image scores (n,) and (n, size, size) maps of embedded features (n, h, w, D):
        one search for all the patches of the batch. Exported models whose search runs
        outside the graph call this on the graph's features."""
        n, h, w, dim = feats.shape
        queries = np.ascontiguousarray(feats, np.float32).reshape(-1, dim)
        nearest = self._nearest(queries)
        # faiss computes |q|^2 - 2 q.m + |m|^2, which loses small distances to
        # cancellation: the distance to the neighbour found is taken directly (as in
        # the exported graph, torch_heads.PatchCoreHead), in blocks of rows that the
        # allocator reuses (see cell_search.QUERY_BLOCK).
        patch_scores = np.empty(len(queries), dtype=np.float32)
        for start in range(0, len(queries), QUERY_BLOCK):
            rows = slice(start, start + QUERY_BLOCK)
            patch_scores[rows] = np.linalg.norm(queries[rows] - self.memory_bank[nearest[rows]],
                                                axis=1)
        patch_scores = patch_scores.reshape(n, h * w)
        nearest = nearest.reshape(n, h * w)
        queries = queries.reshape(n, h * w, dim)
        if self.params.search != "exact" and self.params.exact_top:
            self._search_top_exactly(queries, patch_scores, nearest)
        scores = self._image_scores(queries, patch_scores, nearest)
        return scores, self._anomaly_maps(patch_scores.reshape(n, h, w), size)

    def _search_top_exactly(self, queries: np.ndarray, patch_scores: np.ndarray,
                            nearest: np.ndarray) -> None:
        """Each image's ``exact_top`` highest patch scores searched again exactly, in place.
        An approximate search only overestimates a distance, so the worst patch is among
        them unless more than ``exact_top`` patches were overestimated past it."""
        top = min(self.params.exact_top, patch_scores.shape[1])
        rows = np.arange(len(patch_scores))[:, None]
        worst = np.argpartition(-patch_scores, top - 1, axis=1)[:, :top]      # (n, top)
        picked = np.ascontiguousarray(queries[rows, worst].reshape(-1, queries.shape[2]))
        found = self._exact_neighbours(picked)[:, 0]
        distance = np.linalg.norm(picked - self.memory_bank[found], axis=1)
        patch_scores[rows, worst] = distance.reshape(worst.shape)
        nearest[rows, worst] = found.reshape(worst.shape)

    def _image_scores(self, queries: np.ndarray, patch_scores: np.ndarray,
                      nearest: np.ndarray) -> np.ndarray:
        """Max patch score, reweighted by the isolation of its nearest bank feature."""
        rows = np.arange(len(patch_scores))
        worst = patch_scores.argmax(axis=1)
        best_score = patch_scores[rows, worst]
        k = min(self.params.num_neighbors, len(self.memory_bank))
        if k <= 1:
            return best_score
        test_feats = queries[rows, worst]                      # m_test*
        anchors = self.memory_bank[nearest[rows, worst]]       # m*
        # N_b(m*), m* itself first; exactly unless the search is a graph (banks of millions).
        if self.params.search == "hnsw":
            _, neighbours = self.index.search(anchors, k)
        else:
            neighbours = self._exact_neighbours(anchors, k)
        dists = np.linalg.norm(self.memory_bank[neighbours] - test_feats[:, None, :], axis=2)
        # w = 1 - exp(s*) / sum_{m in N_b(m*)} exp(||m_test* - m||), as a stable softmax.
        shifted = np.exp(dists - dists.max(axis=1, keepdims=True))
        weight = 1.0 - shifted[:, 0] / shifted.sum(axis=1)
        return (weight * best_score).astype(np.float32)

    def _anomaly_maps(self, patch_scores: np.ndarray, size: int) -> np.ndarray:
        if self._search_device != "cpu" and MapPost.fits(size, self.params.smoothing_sigma):
            # On a GPU: the exported graph's upsampling and blur (scipy's, as convolutions).
            post = MapPost(size, self.params.smoothing_sigma).to(self._search_device)
            with torch.inference_mode():
                return post(torch.from_numpy(patch_scores).to(self._search_device)).cpu().numpy()
        return upsample_and_smooth(patch_scores, size, self.params.smoothing_sigma)

    def torch_head(self, input_size: int) -> PatchCoreHead | PatchEmbedHead:
        """Exact search: in the graph; each bank vector's ``num_neighbors`` nearest bank
        vectors (itself first) are found once here, by the exact flat index (also for
        "hnsw", whose graph is not saved with the model). "ivf": the graph ends at the
        embedded patch features, which the exported scorer hands to ``score_embedded``
        (the same search, over the same saved cells)."""
        if self.params.search == "ivf":
            return PatchEmbedHead(self.params.border_pooling == "zero_padded")
        k = min(self.params.num_neighbors, len(self.memory_bank))
        _, neighbours = self.exact_index.search(self.memory_bank, k)
        return PatchCoreHead(self.memory_bank, neighbours, input_size,
                             self.params.smoothing_sigma,
                             self.params.border_pooling == "zero_padded")

    # -- persistence -------------------------------------------------------------
    def _save_state(self, directory: Path) -> None:
        np.save(directory / "memory_bank.npy", self.memory_bank)
        if self.params.search == "ivf":
            # k-means once, at training: every copy of the model searches the same cells.
            self.index.save(directory)

    def _load_state(self, directory: Path) -> None:
        self.memory_bank = np.load(directory / "memory_bank.npy")
        self._index = self._exact = None
        self._cells = CellIndex.load(directory, self.memory_bank, self.params.ivf_probe)
