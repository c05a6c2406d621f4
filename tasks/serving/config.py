"""A registered detector's scoring settings (``scoring.json``): everything besides the fitted
detector that turns a new image into its input and its score into a verdict, as the
pipeline's result that the detector came from set them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ..jsonsettings import JsonSettings
from ..results import DetectorResult

CONFIG_NAME = "scoring.json"
CONFIG_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ScoringConfig(JsonSettings):
    """Everything besides the fitted detector that scoring a new image needs."""

    method: str
    dataset: str
    category: str
    backbone: str
    layers: tuple[str, ...]
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    threshold: float               # image-score threshold from held-out good images
    denoise: dict | None = None
    patch_size: int | None = None  # None: each whole image is one patch
    patch_stride: int | None = None
    min_mean_intensity: float = 31.0
    batch_size: int = 8
    device: str = "auto"
    map_vmax: float | None = None  # overlay colour scale: the evaluation's (0.99 quantile of peaks)
    version: int = CONFIG_VERSION

    _VERSION = CONFIG_VERSION
    _WHAT = "scoring settings"
    _TUPLES = ("layers", "mean", "std")

    @property
    def stats(self) -> dict:
        """The normalization dict the pipeline's steps pass around (with its denoising)."""
        return {"mean": list(self.mean), "std": list(self.std), "denoise": self.denoise}


def config_from_pipeline(params, result: DetectorResult, threshold: float,
                         map_vmax: float | None = None) -> ScoringConfig:
    """The scoring settings of one pipeline result."""
    stats = result.normalization
    return ScoringConfig(
        method=result.method, dataset=params.dataset_name, category=result.category,
        backbone=params.features.backbone, layers=tuple(params.features.layers),
        input_size=int(params.features.input_size), mean=tuple(stats["mean"]),
        std=tuple(stats["std"]), threshold=float(threshold), denoise=stats.get("denoise"),
        patch_size=params.patches.size, patch_stride=params.patches.stride,
        min_mean_intensity=float(params.patches.min_mean_intensity),
        batch_size=int(params.features.batch_size), device=params.features.device,
        map_vmax=map_vmax)


def overlay_scale(scores_dir: str | Path, sample: int = 2000) -> float | None:
    """The evaluation's overlay colour scale: 0.99 quantile of the scored maps' peaks
    (read for at most ``sample`` evenly spaced maps, so large runs stay cheap)."""
    path = Path(scores_dir) / "anomaly_maps.npy"
    if not path.is_file():
        return None
    maps = np.load(path, mmap_mode="r")
    if not len(maps):
        return None
    rows = np.unique(np.linspace(0, len(maps) - 1, min(sample, len(maps))).astype(int))
    peaks = np.asarray(maps[rows], dtype=np.float32).max(axis=(1, 2))
    return float(np.quantile(peaks, 0.99))
