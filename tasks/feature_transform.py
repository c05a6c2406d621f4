"""The transformation blocks of the heterogeneous feature ensemble (thesis 004, 2.1).

Maps of several networks, already on one grid, become one map:

* global block: all networks' channels concatenated, then one PCA to ``channels`` maps;
* individual block: one PCA per network to ``channels`` maps each, then concatenated.

``channels=None`` keeps every channel (concatenation only). The PCA is fitted on training
features only, streamed in float64 (per-channel sums and cross products), and is the same
numbers on every run (``principal_components`` fixes the eigenvectors' signs). A fitted
:class:`FeatureTransform` is saved as one ``.npz`` and travels with the models trained on
its output, so new images are transformed exactly as the training images were.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DefectflowError
from .images import text_hash
from .methods.ensemble import principal_components

TRANSFORM_NAME = "feature_transform.npz"


def to_grid(maps: Iterable[np.ndarray], grid: tuple[int, int]) -> torch.Tensor:
    """(n, C, h, w) float32: each (n, C_i, h_i, w_i) map bilinearly resized to ``grid``,
    concatenated along the channels (the resize of the thesis's blocks)."""
    parts = []
    for fmap in maps:
        part = torch.from_numpy(np.asarray(fmap, dtype=np.float32))
        if tuple(part.shape[-2:]) != tuple(grid):
            part = F.interpolate(part, size=tuple(grid), mode="bilinear", align_corners=False)
        parts.append(part)
    return torch.cat(parts, dim=1)


class _Moments:
    """Streaming mean and covariance of row vectors, around the first chunk's mean (float64)."""

    def __init__(self):
        self.count, self.shift, self.sum, self.outer = 0, None, None, None

    def add(self, rows: torch.Tensor) -> None:
        x = rows.to(torch.float64)
        if self.shift is None:
            self.shift = x.mean(dim=0)
            self.sum = torch.zeros_like(self.shift)
            self.outer = torch.zeros(len(self.shift), len(self.shift), dtype=torch.float64)
        centred = x - self.shift
        self.sum += centred.sum(dim=0)
        self.outer += centred.T @ centred
        self.count += len(x)

    def mean_and_covariance(self) -> tuple[np.ndarray, np.ndarray]:
        n = self.count
        centred_mean = self.sum / n
        cov = (self.outer - n * torch.outer(centred_mean, centred_mean)) / max(n - 1, 1)
        return (self.shift + centred_mean).numpy(), cov.numpy()


@dataclass(frozen=True)
class FeatureTransform:
    """A fitted transformation block: which networks each PCA covers and its numbers.

    ``blocks[b]`` lists the source indices block ``b`` concatenates (global: one block of
    all; individual: one block per source); ``means[b]``/``components[b]`` are its PCA
    (None: the block's channels kept as they are). ``source_channels[i]`` is the number of
    channels source ``i`` gives; ``grid`` the common (h, w).
    """

    combine: str
    grid: tuple[int, int]
    source_channels: tuple[int, ...]
    blocks: tuple[tuple[int, ...], ...]
    means: tuple[np.ndarray | None, ...]
    components: tuple[np.ndarray | None, ...]

    @property
    def channels(self) -> int:
        """Channels of the combined map."""
        return sum(len(c) if c is not None else sum(self.source_channels[i] for i in block)
                   for block, c in zip(self.blocks, self.components))

    def apply(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """(n, channels, h, w) float32 from each source's (n, C_i, h, w) maps on the grid."""
        out = []
        for block, mean, components in zip(self.blocks, self.means, self.components):
            x = torch.cat([parts[i] for i in block], dim=1)
            if components is not None:
                n, d, h, w = x.shape
                rows = x.permute(0, 2, 3, 1).reshape(-1, d) - torch.from_numpy(mean)
                x = (rows @ torch.from_numpy(components).T).reshape(n, h, w, -1)
                x = x.permute(0, 3, 1, 2)
            out.append(x)
        return torch.cat(out, dim=1).contiguous()

    def digest(self) -> str:
        """Content hash of the transform (what a combined store's key is made of)."""
        arrays = [a.tobytes() for a in (*self.means, *self.components) if a is not None]
        return text_hash("feature-transform-v1", self.combine, self.grid, self.source_channels,
                         self.blocks, *(text_hash(a) for a in arrays))

    def save(self, path: str | Path) -> Path:
        arrays = {f"{kind}_{b}": value
                  for kind, values in (("mean", self.means), ("components", self.components))
                  for b, value in enumerate(values) if value is not None}
        np.savez(path, combine=np.asarray(self.combine), grid=np.asarray(self.grid),
                 source_channels=np.asarray(self.source_channels),
                 block_of=np.asarray([b for b, block in enumerate(self.blocks) for _ in block]),
                 block_sources=np.asarray([i for block in self.blocks for i in block]),
                 **arrays)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "FeatureTransform":
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DefectflowError(f"cannot read the feature transform ({exc})", path) from None
        block_of, sources = data["block_of"].tolist(), data["block_sources"].tolist()
        blocks = tuple(tuple(i for i, b in zip(sources, block_of) if b == k)
                       for k in range(max(block_of) + 1))

        def optional(name):
            return data[name] if name in data.files else None

        return cls(str(data["combine"]), tuple(int(v) for v in data["grid"]),
                   tuple(int(v) for v in data["source_channels"]), blocks,
                   tuple(optional(f"mean_{b}") for b in range(len(blocks))),
                   tuple(optional(f"components_{b}") for b in range(len(blocks))))


def fit_transform(combine: str, channels: int | None, grid: tuple[int, int],
                  source_channels: Sequence[int], source_names: Sequence[str],
                  train_chunks: Iterable[list[torch.Tensor]]) -> FeatureTransform:
    """Fit the ``combine`` block's PCA to ``channels`` maps on the training chunks (each a
    list of every source's (n, C_i, h, w) maps on ``grid``).

    Raises DefectflowError naming ``features.channels`` when a PCA would keep more maps
    than the channels it is given.
    """
    count = len(source_channels)
    blocks = (tuple(range(count)),) if combine == "global" else tuple((i,) for i in
                                                                     range(count))
    if channels is None:
        return FeatureTransform(combine, tuple(grid), tuple(source_channels), blocks,
                                (None,) * len(blocks), (None,) * len(blocks))
    for block in blocks:
        available = sum(source_channels[i] for i in block)
        if channels > available:
            what = ("the sources together" if len(block) > 1
                    else f"source {block[0]} ({source_names[block[0]]})")
            raise DefectflowError(f"features.channels: {channels} is more than the "
                                  f"{available} channels {what} give")
    moments = [_Moments() for _ in blocks]
    for parts in train_chunks:
        for block, moment in zip(blocks, moments):
            x = torch.cat([parts[i] for i in block], dim=1)
            moment.add(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]))
    if moments[0].count == 0:
        raise DefectflowError("the feature transform needs training images; there are none")
    means, components = [], []
    for moment in moments:
        mean, cov = moment.mean_and_covariance()
        means.append(mean.astype(np.float32))
        components.append(principal_components(cov, channels)[0])
    return FeatureTransform(combine, tuple(grid), tuple(source_channels), blocks,
                            tuple(means), tuple(components))
