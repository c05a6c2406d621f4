"""Torch forms of the feature detectors' scoring, for export as one graph (ONNX, OpenVINO).

A head takes the backbone's feature maps (a list in the detector's layer order, float32
(B, C, h, w)) and returns image scores (B,) and anomaly maps (B, S, S), with the same
operations as the detector's numpy/faiss scoring, so an exported model scores as the
registered pyfunc does. Only static-shape tensor operations are used (MatMul, ReduceMin,
Gather, Resize, Conv), which ONNX opset 17 and OpenVINO both carry.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from torch import nn


def blur_radius(sigma: float, truncate: float = 4.0) -> int:
    """scipy.ndimage.gaussian_filter's kernel radius for ``sigma``."""
    return int(truncate * float(sigma) + 0.5)


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy.ndimage.gaussian_filter's 1-D kernel (same radius rule and normalization)."""
    radius = blur_radius(sigma, truncate)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / float(sigma) ** 2 * x ** 2)
    return (phi / phi.sum()).astype(np.float32)


def _reflect_index(size: int, radius: int) -> torch.Tensor:
    """Indices that pad an axis of ``size`` by ``radius`` as scipy's mode 'reflect'
    (d c b a | a b c d | d c b a): the edge sample is repeated."""
    inner = np.arange(size)
    return torch.from_numpy(np.concatenate([inner[:radius][::-1], inner,
                                            inner[size - radius:][::-1]]).copy())


class MapPost(nn.Module):
    """(B, h, w) patch scores -> (B, S, S) maps: bilinear upsampling (align_corners=False,
    as ``F.interpolate`` in the detectors), then scipy's Gaussian blur (mode 'reflect',
    truncate 4) as a fixed separable convolution."""

    def __init__(self, size: int, sigma: float):
        super().__init__()
        self.size = size
        self.sigma = float(sigma)
        if self.sigma > 0:
            kernel = torch.from_numpy(gaussian_kernel(self.sigma))
            radius = (len(kernel) - 1) // 2
            if not self.fits(size, sigma):
                raise ValueError(f"smoothing radius {radius} exceeds the map size {size}")
            self.register_buffer("kernel_x", kernel.view(1, 1, 1, -1))
            self.register_buffer("kernel_y", kernel.view(1, 1, -1, 1))
            self.register_buffer("pad_index", _reflect_index(size, radius))

    @staticmethod
    def fits(size: int, sigma: float) -> bool:
        """Whether the blur's reflection padding fits in a map of ``size``."""
        return sigma <= 0 or blur_radius(sigma) <= size

    def forward(self, patch_scores: torch.Tensor) -> torch.Tensor:
        maps = F.interpolate(patch_scores[:, None], size=(self.size, self.size),
                             mode="bilinear", align_corners=False)
        if self.sigma > 0:
            # scipy filters axis 0 (rows) first, then axis 1.
            maps = F.conv2d(maps.index_select(2, self.pad_index), self.kernel_y)
            maps = F.conv2d(maps.index_select(3, self.pad_index), self.kernel_x)
        return maps[:, 0]


def upsample_and_smooth(patch_scores: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """(n, h, w) patch scores -> (n, size, size) float32 maps on the CPU: what ``MapPost``
    computes, with OpenCV, one call per step and map. Bilinear upsampling with half-pixel
    centres (``F.interpolate``, ``align_corners=False``), then scipy's Gaussian blur
    (``gaussian_kernel``, mode 'reflect' = OpenCV's BORDER_REFLECT): the maps of
    ``F.interpolate`` + ``scipy.ndimage.gaussian_filter`` to float32 rounding (4e-7 of the
    peak, measured), about 6x faster. A blur wider than the map falls back to scipy."""
    scores = np.ascontiguousarray(patch_scores, np.float32)
    maps = np.empty((len(scores), size, size), dtype=np.float32)
    kernel = gaussian_kernel(sigma) if sigma > 0 else None
    for index, grid in enumerate(scores):
        upsampled = cv2.resize(grid, (size, size), interpolation=cv2.INTER_LINEAR)
        if kernel is None:
            maps[index] = upsampled
        elif MapPost.fits(size, sigma):
            maps[index] = cv2.sepFilter2D(upsampled, cv2.CV_32F, kernel, kernel,
                                          borderType=cv2.BORDER_REFLECT)
        else:
            maps[index] = gaussian_filter(upsampled, sigma=sigma)
    return maps


def upsample_to_first(maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every map resized bilinearly to the first (shallowest) map's grid."""
    grid = maps[0].shape[-2:]
    return [m if m.shape[-2:] == grid else
            F.interpolate(m, size=grid, mode="bilinear", align_corners=False) for m in maps]


class PatchEmbedHead(nn.Module):
    """PatchCore's locally aware embedding alone, (B, h, w, D), as ``patchcore.embed``:
    the head of a PatchCore whose approximate search runs outside the graph."""

    outputs_features = True

    def __init__(self, count_include_pad: bool):
        super().__init__()
        self.count_include_pad = count_include_pad

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        pooled = [F.avg_pool2d(m, kernel_size=3, stride=1, padding=1,
                               count_include_pad=self.count_include_pad) for m in maps]
        return torch.cat(upsample_to_first(pooled), dim=1).permute(0, 2, 3, 1)


class PatchCoreHead(nn.Module):
    """PatchCore's scoring: locally aware embedding, exact nearest neighbour in the memory
    bank (found by ``|q|^2 - 2 q.m + |m|^2``, as faiss's flat index does for batches; its
    distance then taken directly), the
    paper's reweighting of the worst patch (eq. 7; the anchor's neighbours in the bank are
    a precomputed table, since the anchor is a bank vector) and the map post-processing."""

    def __init__(self, bank: np.ndarray, neighbours: np.ndarray, size: int, sigma: float,
                 count_include_pad: bool):
        super().__init__()
        self.register_buffer("bank", torch.from_numpy(np.ascontiguousarray(bank, np.float32)))
        self.register_buffer("bank_t", self.bank.t().contiguous())
        self.register_buffer("bank_sq", (self.bank.double() ** 2).sum(1).float())
        self.register_buffer("neighbours", torch.from_numpy(neighbours.astype(np.int64)))
        self.count_include_pad = count_include_pad
        self.post = MapPost(size, sigma)

    def forward(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = [F.avg_pool2d(m, kernel_size=3, stride=1, padding=1,
                               count_include_pad=self.count_include_pad) for m in maps]
        feats = torch.cat(upsample_to_first(pooled), dim=1)          # (B, D, h, w)
        n, dim, h, w = feats.shape
        queries = feats.flatten(2).transpose(1, 2)                   # (B, P, D)
        sq_dist = (queries * queries).sum(-1, keepdim=True) - 2 * (queries @ self.bank_t) \
            + self.bank_sq
        nearest = sq_dist.argmin(dim=-1)                             # (B, P)
        # The expanded form loses small distances to cancellation: the distance to the
        # neighbour found is taken directly, as PatchCore.score does.
        patch_scores = (queries - self.bank[nearest]).pow(2).sum(-1).sqrt()
        best, worst = patch_scores.max(dim=-1)                       # (B,)
        test_feats = torch.gather(queries, 1, worst.view(n, 1, 1).expand(n, 1, dim))[:, 0]
        anchors = torch.gather(nearest, 1, worst.view(n, 1))[:, 0]  # bank rows of m*
        neighbour_feats = self.bank[self.neighbours[anchors]]        # (B, k, D), m* first
        dists = (neighbour_feats - test_feats[:, None]).pow(2).sum(-1).sqrt()
        weight = 1.0 - torch.softmax(dists, dim=1)[:, 0]
        scores = weight * best if self.neighbours.shape[1] > 1 else best
        return scores, self.post(patch_scores.view(n, h, w))


class PaDiMHead(nn.Module):
    """PaDiM's scoring: the layers stacked on the first grid, the fitted channel subset,
    the Mahalanobis distance to each position's Gaussian, the map post-processing; the
    image score is the map's maximum."""

    def __init__(self, channels: np.ndarray, mean: np.ndarray, inverse_cov: np.ndarray,
                 grid: tuple[int, int], size: int, sigma: float):
        super().__init__()
        self.register_buffer("channels", torch.from_numpy(channels.astype(np.int64)))
        self.register_buffer("mean", torch.from_numpy(mean.astype(np.float32)))      # (P, d)
        self.register_buffer("inverse_cov", torch.from_numpy(inverse_cov.astype(np.float32)))
        self.grid = tuple(grid)
        self.post = MapPost(size, sigma)

    def forward(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        stacked = torch.cat(upsample_to_first(maps), dim=1).index_select(1, self.channels)
        diff = stacked.flatten(2).permute(2, 0, 1) - self.mean[:, None]      # (P, B, d)
        weighted = torch.bmm(diff, self.inverse_cov)                        # (P, B, d)
        dist = (weighted * diff).sum(-1).clamp_min(0).sqrt()                # (P, B)
        anomaly_maps = self.post(dist.t().reshape(-1, *self.grid))
        return anomaly_maps.flatten(1).max(dim=1).values, anomaly_maps
