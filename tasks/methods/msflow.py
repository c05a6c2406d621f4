"""A normalizing-flow detector on cached backbone features (MSFlow / CS-Flow family).

Every backbone layer of the feature store is one scale. Its maps (optionally averaged
``pool`` x ``pool``) are standardized with the training images' statistics and sent
through a flow of its own (affine coupling blocks with conv subnets), then through one
fusion coupling across the scales (``flow_blocks.py``). The flow is trained to maximize
the likelihood of the good training images' features under a standard normal: the loss is
the mean over positions of ``0.5 |z|^2 - log|det J|`` per dimension (the negative
log-likelihood up to a constant).

Standardization (``standardize``). A flow shared by all positions sees one density for the
whole image, but on aligned parts the normal feature depends on the place (PaDiM's
per-position Gaussians are what make PaDiM strong on Magnetic Tile). The default
``whiten`` therefore maps each position's features through its own Gaussian first,
``z0 = L^-1 (x - mu)`` with ``L L^T`` that position's covariance (shrunk toward the pooled
covariance of all positions and + eps, as PaDiM's), so the untrained flow scores PaDiM's
squared Mahalanobis distance, and training learns the non-Gaussian rest, shared across positions and, through the fusion, across scales.
The fixed whitening's own log-determinant is a per-position constant left out of the map,
as PaDiM's distance leaves it out. ``channel`` and ``position`` standardize with one
mean/std per channel, or per channel and position (MSFlow's and CFlow's setting).

The anomaly map is that NLL per position: each scale's map brought to the first layer's
grid and summed (the scales' likelihoods multiplied, MSFlow's "mul" map), upsampled to
the input size and smoothed (sigma 4). The image score is the mean of the top
``top_k`` fraction of the map's pixels (MSFlow's top-k mean; ``top_k=0``: the maximum).

Training reads the store once into memory (float16, the store's own precision; Magnetic
Tile's 686 training images at 224 px with blocks.2 + blocks.4 take 73 MB) and runs
``epochs`` passes of Adam with a cosine learning-rate decay, so a CPU budget of minutes is
spent on a schedule that ends converged rather than cut short. Seeded: the same seed gives
the same weights, loss curve and scores on a CPU.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import cores
from .base import FeatureDetector, PatchSet
from .flow_blocks import MSFlowHead, MultiScaleFlow, flow_inputs
from .padim import GaussianAccumulator

CHUNK_SIZE = 64   # images per feature chunk while reading the store
STANDARDIZE = ("channel", "position", "whiten")


@dataclass(frozen=True)
class MSFlowParams:
    layers: tuple[str, ...] = ("blocks.2", "blocks.4")
    blocks: int = 4                    # coupling blocks of each scale's parallel flow
    fusion: bool = True                # one fusion coupling across the scales after them
    hidden_ratio: float = 1.0          # subnet hidden channels / the scale's channels
    kernel: int = 1                    # subnet conv size (MSFlow, CS-Flow: 3; 1 is 3x faster)
    clamp_alpha: float = 1.9           # soft clamping of the log-scales (MSFlow: 1.9)
    positional: int = 0                # channels of the positional condition (0: none)
    pool: int = 1                      # average-pooling window before the flow (1: none)
    # True: the layers are stacked on the first one's grid into one scale (PaDiM's stacking,
    # so the whitening and the flow see every layer at a place together); False: one
    # parallel flow per layer, joined by the fusion coupling (MSFlow).
    stack: bool = True
    # Standardization before the flow: "channel" (a mean and std per channel), "position"
    # (per channel and grid position) or "whiten" (per position: the mean and the full
    # covariance, PaDiM's Gaussian; the untrained flow then scores PaDiM's Mahalanobis
    # distance, and training models what that Gaussian misses).
    standardize: str = "whiten"
    eps: float = 0.01                  # variance added, x the layer's mean channel variance
    epochs: int = 8
    batch_size: int = 16               # images per step (each gives every grid position)
    learning_rate: float = 1e-3        # Adam, cosine-decayed to 0 over the epochs
    weight_decay: float = 1e-5
    top_k: float = 0.01                # fraction of map pixels averaged for the image score
    smoothing_sigma: float = 4.0       # Gaussian blur of the upsampled anomaly map
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"the flow needs 1 or more distinct layers, got {self.layers}")
        for name in ("blocks", "epochs", "batch_size", "kernel", "pool"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kernel % 2 == 0 or self.pool % 2 == 0:
            raise ValueError(f"kernel and pool must be odd (centred windows), got "
                             f"{self.kernel} and {self.pool}")
        if self.positional < 0 or self.positional % 4:
            raise ValueError(f"positional must be 0 or a positive multiple of 4, got "
                             f"{self.positional}")
        for name in ("hidden_ratio", "clamp_alpha", "learning_rate", "eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.standardize not in STANDARDIZE:
            raise ValueError(f"standardize must be one of {STANDARDIZE}, got "
                             f"{self.standardize!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.top_k <= 1:
            raise ValueError(f"top_k must be in [0, 1] (0: the map's maximum), got {self.top_k}")
        if self.smoothing_sigma < 0:
            raise ValueError(f"smoothing_sigma must be >= 0, got {self.smoothing_sigma}")


def top_k_count(fraction: float, size: int) -> int:
    """Map pixels averaged for the image score: ``fraction`` of size x size, at least 1."""
    return max(1, int(round(fraction * size * size)))


class MSFlow(FeatureDetector):
    name = "msflow"
    Params = MSFlowParams

    def __init__(self, params: MSFlowParams | None = None):
        super().__init__(params)
        self.flow: MultiScaleFlow | None = None
        self.shapes_: list[tuple[int, int, int]] | None = None   # (C, h, w) of each layer

    def _build(self, shapes: list[tuple[int, int, int]]) -> MultiScaleFlow:
        p = self.params
        with torch.random.fork_rng(devices=[]):   # seeded init without touching global state
            torch.manual_seed(p.seed)
            return MultiScaleFlow([c for c, _, _ in shapes], [(h, w) for _, h, w in shapes],
                                  [p.blocks] * len(shapes), p.hidden_ratio, p.kernel,
                                  p.clamp_alpha, p.fusion, p.positional, p.seed,
                                  standardize=p.standardize)

    def head(self, size: int) -> MSFlowHead:
        return MSFlowHead(self.flow, self.params.pool, self.params.stack, size,
                          self.params.smoothing_sigma,
                          top_k_count(self.params.top_k, size)).eval()

    # -- fitting ---------------------------------------------------------------
    def _train_inputs(self, train: PatchSet) -> list[torch.Tensor]:
        """Each scale's training inputs (``flow_inputs``), float16 in memory, (n, C, h, w)."""
        parts: list[list[torch.Tensor]] = []
        for _, maps in train.feature_chunks(self.params.layers, chunk_size=CHUNK_SIZE):
            scales = flow_inputs([torch.from_numpy(maps[layer]) for layer in self.params.layers],
                                 self.params.pool, self.params.stack)
            parts = parts or [[] for _ in scales]
            for part, scale in zip(parts, scales):
                part.append(scale.half())
        return [torch.cat(part) for part in parts]

    def fit(self, train: PatchSet) -> "MSFlow":
        p = self.params
        if len(train) < 2:
            raise ValueError(f"the flow needs at least 2 training images, got {len(train)}")
        feats = self._train_inputs(train)
        self.shapes_ = [tuple(int(v) for v in f.shape[1:]) for f in feats]
        self.flow = self._build(self.shapes_)
        means, scales = zip(*(standardization(f, p.standardize, p.eps) for f in feats))
        self.flow.set_standardization(list(means), list(scales))
        self.flow.to(train.device)
        self.history = {"train_loss": self._train(feats, train.device)}
        self.flow.cpu().eval()
        return self

    def _train(self, feats: list[torch.Tensor], device: str) -> list[float]:
        p = self.params
        n = len(feats[0])
        generator = torch.Generator().manual_seed(p.seed)
        optimizer = torch.optim.Adam(self.flow.parameters(), lr=p.learning_rate,
                                     weight_decay=p.weight_decay)
        steps_per_epoch = math.ceil(n / p.batch_size)
        total = p.epochs * steps_per_epoch
        self.flow.train()
        curve, step = [], 0
        for _ in range(p.epochs):
            order = torch.randperm(n, generator=generator)
            loss_sum = 0.0
            for start in range(0, n, p.batch_size):
                cores.follow()
                rows = order[start:start + p.batch_size]
                # Cosine decay from learning_rate to 0 over all steps.
                for group in optimizer.param_groups:
                    group["lr"] = 0.5 * p.learning_rate * (1 + math.cos(math.pi * step / total))
                nll = self.flow([f[rows].to(device=device, dtype=torch.float32) for f in feats])
                loss = sum(scale.mean() for scale in nll)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                loss_sum += loss.item() * len(rows)
                step += 1
            curve.append(loss_sum / n)
        return curve

    # -- scoring ---------------------------------------------------------------
    @torch.no_grad()
    def score(self, batch: PatchSet) -> tuple[np.ndarray, np.ndarray]:
        size = batch.input_size
        head = self.head(size).to(batch.device)
        scores = np.zeros(len(batch), dtype=np.float32)
        anomaly_maps = np.zeros((len(batch), size, size), dtype=np.float32)
        for part, maps in batch.feature_chunks(self.params.layers, chunk_size=CHUNK_SIZE):
            s, m = head([torch.from_numpy(maps[layer]).to(batch.device)
                         for layer in self.params.layers])
            scores[part], anomaly_maps[part] = s.cpu().numpy(), m.cpu().numpy()
        self.flow.cpu()
        return scores, anomaly_maps

    def torch_head(self, input_size: int) -> MSFlowHead:
        return self.head(input_size)

    # -- persistence -------------------------------------------------------------
    def _save_state(self, directory: Path) -> None:
        (directory / "shapes.json").write_text(json.dumps(self.shapes_))
        torch.save({k: v.cpu() for k, v in self.flow.state_dict().items()}, directory / "flow.pt")

    def _load_state(self, directory: Path) -> None:
        self.shapes_ = [tuple(s) for s in json.loads((directory / "shapes.json").read_text())]
        self.flow = self._build(self.shapes_)
        self.flow.load_state_dict(torch.load(directory / "flow.pt", weights_only=True))
        self.flow.eval()



def standardization(feats: torch.Tensor, mode: str, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) of one layer's training maps (n, C, h, w) for ``MultiScaleFlow``: the
    scale is 1/std, or (``whiten``) the transposed inverse Cholesky factor of each position's
    covariance. ``eps`` x the layer's mean channel variance is added to every variance, so
    a position whose feature barely varies (a uniform background) is not blown up."""
    n, c, h, w = feats.shape
    # float64 sums over chunks: a float64 copy of all maps would be 4x the float16 ones.
    total, squares = torch.zeros(c, h, w, dtype=torch.float64), torch.zeros(c, h, w,
                                                                           dtype=torch.float64)
    for x in _chunks(feats):
        total += x.sum(0)
        squares += (x * x).sum(0)
    position_mean = total / n
    channel_mean = position_mean.mean((1, 2))
    channel_var = squares.sum((1, 2)) / (n * h * w) - channel_mean ** 2
    floor = eps * float(channel_var.mean().clamp_min(1e-12))
    if mode == "channel":
        return (channel_mean.float().numpy(),
                (1.0 / (channel_var.clamp_min(0) + floor).sqrt()).float().numpy())
    if mode == "position":
        position_var = (squares / n - position_mean ** 2).clamp_min(0)
        return (position_mean.float().numpy(),
                (1.0 / (position_var + floor).sqrt()).float().numpy())
    gaussians = GaussianAccumulator()
    for x in _chunks(feats):
        gaussians.add(x.flatten(2).transpose(1, 2))                              # (k, P, C)
    # Shrunk toward the pooled covariance of all positions, as PaDiM's (padim.py says why):
    # a position that barely varies in training (a dark background, a rim the object moves
    # across, any position with fewer images than channels) is not blown up by whitening.
    mean, cov = gaussians.mean_and_shrunk_covariance(None)                        # (P, C), (P, C, C)
    cov = cov + floor * torch.eye(c, dtype=cov.dtype)
    lower = torch.linalg.cholesky(cov)
    inverse = torch.linalg.solve_triangular(lower, torch.eye(c, dtype=cov.dtype).expand_as(cov),
                                            upper=False)                          # L^-1
    return (mean.T.reshape(c, h, w).float().numpy(),
            inverse.transpose(1, 2).float().numpy())


def _chunks(feats: torch.Tensor):
    """``feats`` (n, ...) in float64 pieces of CHUNK_SIZE images."""
    for start in range(0, len(feats), CHUNK_SIZE):
        yield feats[start:start + CHUNK_SIZE].double()
