"""PaDiM (Defard et al., ICPR workshops 2021): one Gaussian of normal features per patch position.

Feature maps of two or three backbone layers are upsampled bilinearly to the
first (shallowest) layer's grid and concatenated; a seeded random subset of
the channels is kept (the paper's random dimensionality reduction). At every
grid position (i, j) a multivariate Gaussian N(mu_ij, Sigma_ij + eps I) is
fitted to the training images' features there.

Sigma_ij is the sample covariance shrunk toward the pooled covariance of all
positions, (1 - a) S_ij + a S_pooled, as in regularized discriminant analysis
(Friedman 1989); this is the posterior mean under an inverse-Wishart prior
centred on S_pooled that weighs as much as d extra images, so a = d / (d + n - 1)
by default. The paper's S_ij + 0.01 I alone breaks where a position's features
barely vary in training (a dark, uniform background; a rim the object moves
across; any position when n < d): their covariance has directions of almost
zero variance, 0.01 is hundreds of times below the variance of this backbone's
features, and sensor noise or a small drift there becomes a huge Mahalanobis
distance: the map lit the background, not the defect (issue 19). A test feature's anomaly
score is its Mahalanobis distance to the Gaussian of its own position; the
distance map is upsampled to the input size and smoothed (sigma 4), and the
image score is the map's maximum.

Fitting streams over the feature store and keeps only per-position sums and
sums of outer products, so memory is bounded by the model size
(h*w x d x d), not by the number of training images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .base import FeatureDetector, PatchSet
from .torch_heads import PaDiMHead, upsample_and_smooth

CHUNK_SIZE = 64   # images per feature chunk: bounds the (n, h*w, d) working arrays


@dataclass(frozen=True)
class PaDiMParams:
    layers: tuple[str, ...] = ("blocks.2", "blocks.4")
    n_channels: int = 100              # random channel subset (the paper's d); capped at the total
    eps: float = 0.01                  # covariance regularization eps * I, as in the paper
    # Weight a of the pooled covariance in (1 - a) S_ij + a S_pooled; None: d / (d + n - 1),
    # an inverse-Wishart prior worth d images (d channels, n training images). 0: the paper.
    shrinkage: float | None = None
    smoothing_sigma: float = 4.0       # Gaussian blur of the upsampled anomaly map
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        # One layer: a combined feature source (features.sources), already multi-network.
        if not 1 <= len(self.layers) <= 3 or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"PaDiM needs 1 to 3 distinct layers, got {self.layers}")
        if self.n_channels < 1:
            raise ValueError(f"n_channels must be >= 1, got {self.n_channels}")
        if self.shrinkage is not None and not 0 <= self.shrinkage <= 1:
            raise ValueError(f"shrinkage must be from 0 to 1 (or null: automatic), "
                             f"got {self.shrinkage}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0 (it keeps covariances invertible), got {self.eps}")
        if self.smoothing_sigma < 0:
            raise ValueError(f"smoothing_sigma must be >= 0, got {self.smoothing_sigma}")


def stack_layers(feature_maps: dict[str, np.ndarray], layers) -> torch.Tensor:
    """(n, C_total, h, w): all layers upsampled bilinearly to the first one's grid, concatenated."""
    grid = feature_maps[layers[0]].shape[-2:]
    parts = []
    for layer in layers:
        fmap = torch.from_numpy(feature_maps[layer])
        if fmap.shape[-2:] != grid:
            fmap = F.interpolate(fmap, size=grid, mode="bilinear", align_corners=False)
        parts.append(fmap)
    return torch.cat(parts, dim=1)


class GaussianAccumulator:
    """Streaming per-position mean and covariance of (n, p, d) batches, in float64.

    Sums are taken around a shift (the first batch's mean), which avoids the
    cancellation of E[xx^T] - mu mu^T when the mean is large against the spread.
    """

    def __init__(self):
        self.count = 0
        self.shift: torch.Tensor | None = None     # (p, d)
        self.sum: torch.Tensor | None = None       # (p, d)
        self.outer: torch.Tensor | None = None     # (p, d, d)

    def add(self, features: torch.Tensor) -> None:
        x = features.to(torch.float64)
        if self.shift is None:
            self.shift = x.mean(dim=0)
            p, d = self.shift.shape
            self.sum = torch.zeros(p, d, dtype=torch.float64, device=x.device)
            self.outer = torch.zeros(p, d, d, dtype=torch.float64, device=x.device)
        centred = (x - self.shift).transpose(0, 1)                   # (p, n, d)
        self.sum += centred.sum(dim=1)
        self.outer += torch.bmm(centred.transpose(1, 2), centred)   # sum_n x x^T per position
        self.count += x.shape[0]

    def mean_and_covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (p, d) and unbiased sample covariance (p, d, d), float64."""
        if self.count == 0:
            raise ValueError("no training features were seen")
        n = self.count
        centred_mean = self.sum / n
        # Unbiased (n - 1) as np.cov in the paper's code; a single sample gives zeros.
        cov = (self.outer - n * centred_mean[:, :, None] * centred_mean[:, None, :]) / max(n - 1, 1)
        return self.shift + centred_mean, cov

    def mean_and_shrunk_covariance(self, shrinkage: float | None = None
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (p, d) and (1 - a) S + a S_pooled (p, d, d), float64: each position's sample
        covariance S shrunk toward S_pooled, the mean of all positions' covariances, by
        ``shrinkage`` a; None: a = d / (d + n - 1), an inverse-Wishart prior worth d images."""
        mean, cov = self.mean_and_covariance()
        d = cov.shape[-1]
        if shrinkage is None:
            shrinkage = d / (d + max(self.count - 1, 0))
        if shrinkage > 0:
            cov = (1 - shrinkage) * cov + shrinkage * cov.mean(dim=0, keepdim=True)
        return mean, cov

    def mean_and_inverse_covariance(self, eps: float, shrinkage: float | None = 0.0
                                    ) -> tuple[np.ndarray, np.ndarray]:
        """Mean (p, d) and inverse of (shrunk sample covariance + eps I) (p, d, d), float32
        (``shrinkage`` as in ``mean_and_shrunk_covariance``)."""
        mean, cov = self.mean_and_shrunk_covariance(shrinkage)
        d = cov.shape[-1]
        cov = cov + eps * torch.eye(d, dtype=cov.dtype, device=cov.device)
        inverse = torch.linalg.inv(cov)
        inverse = 0.5 * (inverse + inverse.transpose(1, 2))          # exact symmetry after rounding
        return mean.float().cpu().numpy(), inverse.float().cpu().numpy()


def mahalanobis(features: torch.Tensor, mean: torch.Tensor, inverse_cov: torch.Tensor
                ) -> torch.Tensor:
    """(n, p) distances of features (n, p, d) to per-position Gaussians (mean, inverse cov)."""
    diff = features - mean
    weighted = torch.einsum("npd,pde->npe", diff, inverse_cov)
    return (weighted * diff).sum(dim=-1).clamp_min(0).sqrt()


class PaDiM(FeatureDetector):
    name = "padim"
    Params = PaDiMParams

    def __init__(self, params: PaDiMParams | None = None):
        super().__init__(params)
        self.channels: np.ndarray | None = None        # indices into the concatenated channels
        self.mean: np.ndarray | None = None            # (h*w, d)
        self.inverse_cov: np.ndarray | None = None     # (h*w, d, d)
        self.grid: tuple[int, int] | None = None

    def _features(self, maps: dict[str, np.ndarray], device: str) -> torch.Tensor:
        """(n, h*w, d) selected channels of the stacked layers."""
        stacked = stack_layers(maps, self.params.layers)
        if self.channels is None:
            total = stacked.shape[1]
            rng = np.random.default_rng(self.params.seed)
            self.channels = np.sort(rng.choice(total, size=min(self.params.n_channels, total),
                                               replace=False))
            self.grid = tuple(stacked.shape[-2:])
        selected = stacked[:, torch.from_numpy(self.channels)]
        return selected.flatten(2).transpose(1, 2).to(device)

    # -- fitting ---------------------------------------------------------------
    def fit(self, train: PatchSet) -> "PaDiM":
        self.channels = None
        gaussians = GaussianAccumulator()
        for _, maps in train.feature_chunks(self.params.layers, chunk_size=CHUNK_SIZE):
            gaussians.add(self._features(maps, train.device))
        self.mean, self.inverse_cov = gaussians.mean_and_inverse_covariance(self.params.eps,
                                                                          self.params.shrinkage)
        return self

    # -- scoring ---------------------------------------------------------------
    def score(self, batch: PatchSet) -> tuple[np.ndarray, np.ndarray]:
        size = batch.input_size
        mean = torch.from_numpy(self.mean).to(batch.device)
        inverse_cov = torch.from_numpy(self.inverse_cov).to(batch.device)
        anomaly_maps = np.zeros((len(batch), size, size), dtype=np.float32)
        for part, maps in batch.feature_chunks(self.params.layers, chunk_size=CHUNK_SIZE):
            dist = mahalanobis(self._features(maps, batch.device), mean, inverse_cov)
            anomaly_maps[part] = upsample_and_smooth(dist.reshape(-1, *self.grid).cpu().numpy(),
                                                     size, self.params.smoothing_sigma)
        return anomaly_maps.max(axis=(1, 2)), anomaly_maps

    def torch_head(self, input_size: int) -> PaDiMHead:
        return PaDiMHead(self.channels, self.mean, self.inverse_cov, self.grid, input_size,
                         self.params.smoothing_sigma)

    # -- persistence -------------------------------------------------------------
    def _save_state(self, directory: Path) -> None:
        np.savez(directory / "gaussians.npz", channels=self.channels, mean=self.mean,
                 inverse_cov=self.inverse_cov, grid=np.asarray(self.grid))

    def _load_state(self, directory: Path) -> None:
        with np.load(directory / "gaussians.npz") as state:
            self.channels = state["channels"]
            self.mean = state["mean"]
            self.inverse_cov = state["inverse_cov"]
            self.grid = tuple(int(v) for v in state["grid"])
