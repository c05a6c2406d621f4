"""A registered detector's scoring settings (``scoring.json``): everything besides the fitted
detector that turns a new image into its input and its score into a verdict, as the
pipeline's result that the detector came from set them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from ..feature_settings import FeatureSettings
from ..jsonsettings import JsonSettings
from ..results import DetectorResult

CONFIG_NAME = "scoring.json"
B64_COLUMN = "image_b64"  # a DataFrame column of base64-encoded image files (REST requests)
# 2: the feature settings as one nested object; 3: they may name several networks
# (features.sources, combine, channels) whose transform lies in the detector's folder.
CONFIG_VERSION = 3
_FEATURE_FIELDS = ("backbone", "layers", "input_size", "batch_size", "device")
_COMBINED_FIELDS = ("sources", "combine", "channels")  # feature settings added in version 3


@dataclasses.dataclass(frozen=True)
class ScoringConfig(JsonSettings):
    """Everything besides the fitted detector that scoring a new image needs."""

    method: str
    dataset: str
    category: str
    features: FeatureSettings      # the pipeline's own feature settings object
    mean: tuple[float, ...]
    std: tuple[float, ...]
    threshold: float               # image-score threshold from held-out good images
    denoise: dict | None = None
    patch_size: int | None = None  # None: each whole image is one patch
    patch_stride: int | None = None
    min_mean_intensity: float = 31.0
    map_vmax: float | None = None  # overlay colour scale: the evaluation's (0.99 quantile of peaks)
    version: int = CONFIG_VERSION

    _VERSION = CONFIG_VERSION
    _WHAT = "scoring settings"
    _TUPLES = ("mean", "std")
    _NESTED = {"features": FeatureSettings}

    @classmethod
    def _upgrade(cls, data: dict) -> dict:
        # Version 1 (models registered before 2) kept the feature settings as flat fields.
        if data.get("version") == 1:
            features = {name: data.pop(name) for name in _FEATURE_FIELDS if name in data}
            data = {**data, "features": features, "version": 2}
        if data.get("version") == 2:
            # Version 2 had one backbone: its settings read as version 3's defaults.
            data = {**data, "version": 3}
        return data

    def key_text(self) -> str:
        """The settings as the registry's model key hashes them. A single backbone's read as
        version 2 wrote them, so versions registered before 3 are still found on a rerun."""
        data = dataclasses.asdict(self)
        if not self.features.combined:
            for name in _COMBINED_FIELDS:
                data["features"].pop(name)
            data["version"] = 2
        return json.dumps(data, sort_keys=True)

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
        features=params.features, mean=tuple(stats["mean"]),
        std=tuple(stats["std"]), threshold=float(threshold), denoise=stats.get("denoise"),
        patch_size=params.patches.size, patch_stride=params.patches.stride,
        min_mean_intensity=float(params.patches.min_mean_intensity), map_vmax=map_vmax)


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
