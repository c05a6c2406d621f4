"""The normalizing flow of the MSFlow detector (``msflow.py``), written in plain torch.

After MSFlow (Zhou et al., IEEE TNNLS 2024) and CS-Flow (Rudolph et al., WACV 2022):

* **Parallel flows.** Each backbone layer (scale) has its own sequence of blocks. A block is
  a fixed random rotation of the channels (an orthogonal 1x1 convolution, log-det 0: the
  "soft permutation" of FrEIA's all-in-one block, which mixes every channel into both
  halves), then an affine coupling: the second half of the channels is scaled and shifted
  by a subnet of the first half, ``y2 = x2 * exp(s(x1)) + t(x1)``. The subnet is
  conv 3x3 -> ReLU -> conv 3x3, its last convolution starts at zero, so every block starts
  as the identity. ``s`` is soft-clamped, ``alpha * 2/pi * atan(s / alpha)`` (CS-Flow's
  clamping; MSFlow's alpha 1.9), which keeps ``exp(s)`` bounded and training stable.
* **Fusion flow.** One coupling across scales (MSFlow's fusion block): every scale's
  first half, brought to each scale's grid bilinearly, conditions the affine map of that
  scale's second half, so a position's likelihood also sees the other scales there.
* **Position.** Optionally every subnet also reads a fixed sinusoidal encoding of the
  position on the grid (CFlow's positional condition), so the density can differ
  between, say, a tile's border and its middle, as PaDiM's per-position Gaussians do.

The Jacobian of a coupling is triangular with ``exp(s)`` on its diagonal, so
``log|det J|`` is the sum of ``s``; per position, ``-log p(x) = 0.5 |z|^2 - sum s``
(+ a constant), which is both the training loss and the anomaly score.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .torch_heads import MapPost, upsample_to_first


def soft_clamp(s: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * 2/pi * atan(s / alpha)``: slope 2/pi (CS-Flow's 0.636) at 0, bounded by
    +-alpha."""
    return (2.0 * alpha / math.pi) * torch.atan(s / alpha)


def positional_encoding(channels: int, height: int, width: int) -> torch.Tensor:
    """(channels, h, w): sin and cos of the row and of the column at ``channels / 4``
    octaves (pi, 2 pi, 4 pi, ... over the grid), ``channels`` a multiple of 4 (CFlow's
    positional condition, with frequencies that all vary across a small grid)."""
    if channels % 4:
        raise ValueError(f"positional channels must be a multiple of 4, got {channels}")
    freqs = math.pi * 2.0 ** torch.arange(channels // 4, dtype=torch.float64)
    rows = torch.linspace(0, 1, height, dtype=torch.float64)[:, None] * freqs   # (h, f)
    cols = torch.linspace(0, 1, width, dtype=torch.float64)[:, None] * freqs    # (w, f)
    by_row = torch.cat([torch.sin(rows), torch.cos(rows)], 1).T[:, :, None].expand(-1, -1, width)
    by_col = torch.cat([torch.sin(cols), torch.cos(cols)], 1).T[:, None, :].expand(-1, height, -1)
    return torch.cat([by_row, by_col]).float().contiguous()


def subnet(in_channels: int, hidden: int, out_channels: int, kernel: int) -> nn.Sequential:
    """conv k x k -> ReLU -> conv k x k; the last convolution starts at zero (identity block)."""
    net = nn.Sequential(nn.Conv2d(in_channels, hidden, kernel, padding=kernel // 2), nn.ReLU(),
                        nn.Conv2d(hidden, out_channels, kernel, padding=kernel // 2))
    nn.init.zeros_(net[2].weight)
    nn.init.zeros_(net[2].bias)
    return net


def random_rotation(channels: int, generator: torch.Generator) -> torch.Tensor:
    """A (channels, channels) random orthogonal matrix (QR of a Gaussian, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(channels, channels, generator=generator,
                                       dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


class CouplingBlock(nn.Module):
    """Fixed channel rotation, then an affine coupling of the second half on the first."""

    def __init__(self, channels: int, hidden: int, kernel: int, alpha: float, cond: int,
                 generator: torch.Generator):
        super().__init__()
        self.split = channels // 2
        self.alpha = alpha
        self.register_buffer("rotation", random_rotation(channels, generator)[:, :, None, None])
        self.net = subnet(self.split + cond, hidden, 2 * (channels - self.split), kernel)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, log|det J| per position (B, h, w))."""
        x = F.conv2d(x, self.rotation)
        x1, x2 = x[:, :self.split], x[:, self.split:]
        s, t = self.net(x1 if cond is None else torch.cat([x1, cond], 1)).chunk(2, dim=1)
        s = soft_clamp(s, self.alpha)
        return torch.cat([x1, x2 * torch.exp(s) + t], 1), s.sum(1)


class FusionBlock(nn.Module):
    """MSFlow's fusion coupling: each scale's second half is scaled and shifted by a subnet of
    every scale's first half, resized bilinearly to that scale's grid and concatenated."""

    def __init__(self, channels: list[int], hidden_ratio: float, kernel: int, alpha: float,
                 cond: int):
        super().__init__()
        self.splits = [c // 2 for c in channels]
        self.alpha = alpha
        shared = sum(self.splits)
        self.nets = nn.ModuleList(
            subnet(shared + cond, max(1, round(hidden_ratio * c)), 2 * (c - half), kernel)
            for c, half in zip(channels, self.splits))

    def forward(self, xs: list[torch.Tensor], conds: list[torch.Tensor | None]
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        firsts = [x[:, :half] for x, half in zip(xs, self.splits)]
        out, logdets = [], []
        for x, half, net, cond in zip(xs, self.splits, self.nets, conds):
            grid = x.shape[-2:]
            parts = [f if f.shape[-2:] == grid else
                     F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
                     for f in firsts]
            if cond is not None:
                parts.append(cond)
            s, t = net(torch.cat(parts, 1)).chunk(2, dim=1)
            s = soft_clamp(s, self.alpha)
            out.append(torch.cat([x[:, :half], x[:, half:] * torch.exp(s) + t], 1))
            logdets.append(s.sum(1))
        return out, logdets


class MultiScaleFlow(nn.Module):
    """Per-scale standardization, parallel flows, one fusion block; ``forward`` returns each
    scale's per-position negative log-likelihood per dimension, (B, h_s, w_s)."""

    def __init__(self, channels: list[int], grids: list[tuple[int, int]], blocks: list[int],
                 hidden_ratio: float, kernel: int, alpha: float, fusion: bool,
                 positional: int, seed: int, standardize: str = "channel"):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.channels = list(channels)
        self.whiten = standardize == "whiten"
        for i, (c, grid) in enumerate(zip(channels, grids)):
            # Filled by ``set_standardization`` from the training features: a mean per
            # channel ("channel") or per channel and grid position; then a std per channel,
            # per channel and position ("position"), or a whitening matrix per position
            # ("whiten": PaDiM's Gaussian, z = L^-1 (x - mu) with L L^T its covariance).
            per_position = standardize != "channel"
            self.register_buffer(f"mean{i}", torch.zeros((1, c, *grid) if per_position
                                                         else (1, c, 1, 1)))
            if self.whiten:    # stored transposed, (P, C, C), for a batched row-vector product
                self.register_buffer(f"scale{i}", torch.eye(c).repeat(grid[0] * grid[1], 1, 1))
            else:
                self.register_buffer(f"scale{i}", torch.ones((1, c, *grid) if per_position
                                                             else (1, c, 1, 1)))
            if positional:
                self.register_buffer(f"pos{i}", positional_encoding(positional, *grid)[None])
        self.positional = positional
        self.flows = nn.ModuleList(
            nn.ModuleList(CouplingBlock(c, max(1, round(hidden_ratio * c)), kernel, alpha,
                                        positional, generator) for _ in range(n))
            for c, n in zip(channels, blocks))
        self.fusion = (FusionBlock(channels, hidden_ratio, kernel, alpha, positional)
                       if fusion and len(channels) > 1 else None)

    def set_standardization(self, means: list[np.ndarray], scales: list[np.ndarray]) -> None:
        """Each scale's mean and its 1/std or (whiten) transposed whitening matrices, in the
        buffers' shapes."""
        for i, (mean, scale) in enumerate(zip(means, scales)):
            for name, value in ((f"mean{i}", mean), (f"scale{i}", scale)):
                buffer = getattr(self, name)
                buffer.copy_(torch.from_numpy(np.asarray(value, np.float32)).view(buffer.shape))

    def standardized(self, i: int, x: torch.Tensor) -> torch.Tensor:
        x = x - getattr(self, f"mean{i}")
        if not self.whiten:
            return x * getattr(self, f"scale{i}")
        b, c, h, w = x.shape
        white = torch.bmm(x.flatten(2).permute(2, 0, 1), getattr(self, f"scale{i}"))  # (P, B, C)
        return white.permute(1, 2, 0).reshape(b, c, h, w)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        xs, logdets, conds = [], [], []
        for i, (x, flow) in enumerate(zip(maps, self.flows)):
            x = self.standardized(i, x)
            cond = (getattr(self, f"pos{i}").expand(x.shape[0], -1, -1, -1)
                    if self.positional else None)
            logdet = torch.zeros_like(x[:, 0])
            for block in flow:
                x, ld = block(x, cond)
                logdet = logdet + ld
            xs.append(x)
            logdets.append(logdet)
            conds.append(cond)
        if self.fusion is not None:
            xs, fused = self.fusion(xs, conds)
            logdets = [a + b for a, b in zip(logdets, fused)]
        return [(0.5 * (z * z).sum(1) - ld) / c for z, ld, c in zip(xs, logdets, self.channels)]


MAX_NLL = 30000.0   # nats per dimension where the anomaly map saturates (float16-safe)


def pooled(maps: torch.Tensor, window: int) -> torch.Tensor:
    """``window`` x ``window`` average of each position's neighbourhood, stride 1, the
    border averaging only the positions inside the map (window 1: unchanged)."""
    if window <= 1:
        return maps
    return F.avg_pool2d(maps, window, stride=1, padding=window // 2, count_include_pad=False)


def flow_inputs(maps: list[torch.Tensor], pool: int, stack: bool) -> list[torch.Tensor]:
    """The flow's scales from the backbone layers' maps: each layer pooled, and with
    ``stack`` all of them on the first layer's grid, concatenated (PaDiM's stacking: one
    scale whose vectors hold every layer at a place)."""
    maps = [pooled(m, pool) for m in maps]
    return [torch.cat(upsample_to_first(maps), 1)] if stack and len(maps) > 1 else maps


class MSFlowHead(nn.Module):
    """The detector's whole scoring as one torch module (also what ``defectflow export``
    writes): the flow's inputs (``flow_inputs``), its per-position NLL of every scale
    brought to the first layer's grid and summed (the likelihoods multiplied), upsampled
    and smoothed; the image score is the mean of the ``k`` highest map values (k = 1: the
    maximum)."""

    def __init__(self, flow: MultiScaleFlow, pool: int, stack: bool, size: int, sigma: float,
                 k: int):
        super().__init__()
        self.flow = flow
        self.pool = pool
        self.stack = stack
        self.k = k
        self.post = MapPost(size, sigma)

    def patch_scores(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """(B, h, w) summed NLL per dimension on the first layer's grid."""
        nll = self.flow(flow_inputs(maps, self.pool, self.stack))
        summed = torch.cat(upsample_to_first([n[:, None] for n in nll]), 1).sum(1)
        # A feature far outside the training data can reach millions of nats (the shifts
        # grow with the input); the maps are stored as float16 (max 65504), so the NLL
        # saturates at MAX_NLL, thousands of times any good image's value (about 0.5).
        return summed.clamp(max=MAX_NLL)

    def forward(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        anomaly_maps = self.post(self.patch_scores(maps))
        top = anomaly_maps.flatten(1).topk(self.k, dim=1).values
        return top.mean(1), anomaly_maps
