"""The deployable SegAD fusion: its settings (``FusionConfig``), the fused anomaly map and
the one forest fitted to serve, written beside the pipeline's fusion results."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DefectflowError
from ..jsonsettings import JsonSettings
from .forest import fit_classifier
from .segments import count_segments

FUSION_CONFIG_NAME = "fusion.json"
FOREST_NAME = "forest.json"        # XGBoost save_model JSON
SEGMENTS_NAME = "segments.npy"
FUSION_CONFIG_VERSION = 1
FUSION_THRESHOLD = 0.0
# Why margin 0: the forest is fitted with scale_pos_weight = good/defective, so both classes
# weigh the same and margin 0 (weighted log-odds 0) is the forest's own decision boundary,
# with equal costs and no test label involved. A quantile of the training goods' margins
# would be in-sample: the forest has seen those goods, their margins are overconfident and
# the threshold would land too low (false alarms on new good images).
FUSION_THRESHOLD_RULE = "margin 0: the forest's decision boundary (scale_pos_weight-balanced)"


@dataclasses.dataclass(frozen=True)
class FusionConfig(JsonSettings):
    """The deployable SegAD fusion of one category, besides its forest and segment map.

    ``map_low``/``map_high`` per detector put its anomaly maps on one scale for the fused
    map: ``(map - low) / (high - low)`` with ``low`` the mean pixel of the training goods'
    maps and ``high`` the 0.99 quantile of their map peaks, both from held-out good images
    (0: a typical good pixel, 1: as high as the goods' highest peaks).
    """

    category: str
    detectors: tuple[str, ...]      # feature order of the forest
    map_size: int                   # the detectors' map side at input size (S)
    n_segments: int                 # K
    threshold: float                # on the forest's margin
    map_low: tuple[float, ...]
    map_high: tuple[float, ...]
    map_vmax: float | None = None   # overlay colour scale of fused maps
    classifier: str = "brf"
    train_seed: int = 0
    n_train_good: int = 0
    n_train_bad: int = 0
    threshold_rule: str = FUSION_THRESHOLD_RULE
    version: int = FUSION_CONFIG_VERSION

    _VERSION = FUSION_CONFIG_VERSION
    _WHAT = "fusion settings"
    _TUPLES = ("detectors", "map_low", "map_high")


def fused_map(maps_per_detector: Sequence[np.ndarray], config: FusionConfig) -> np.ndarray:
    """The fusion's anomaly maps, (n, S, S) float32: the mean over detectors of each
    detector's maps normalized by its held-out goods (see ``FusionConfig``). The forest's
    margin has no pixel-level counterpart; a per-detector normalized mean keeps every
    detector's evidence and no detector dominates by its scale (PaDiM's Mahalanobis
    distances and PatchCore's kNN distances differ by orders of magnitude)."""
    total = None
    for maps, low, high in zip(maps_per_detector, config.map_low, config.map_high):
        part = (np.asarray(maps, dtype=np.float32) - low) / max(high - low, 1e-12)
        total = part if total is None else total + part
    return (total / len(config.detectors)).astype(np.float32)


def write_deployable_fusion(folder: str | Path, features: pd.DataFrame, labels: pd.Series,
                            train_ids: Sequence[str], seed: int, maps: Sequence[np.ndarray],
                            image_ids: Sequence[str], segments: np.ndarray,
                            detectors: Sequence[str], kind: str, n_jobs: int,
                            category: str) -> FusionConfig:
    """Fit the one forest to serve and write it with its settings into ``folder``.

    It trains on ``train_ids`` with ``seed`` (the first seed's training split: held-out
    goods plus its labelled or synthetic defects), exactly as the protocol fitted that seed,
    so it is the forest behind that seed's evaluation scores. ``maps``: each detector's
    (n, S, S) maps of the real images ``image_ids``; the training goods among them set the
    per-detector map scale. Writes ``forest.json``, ``segments.npy`` and ``fusion.json``.
    """
    folder = Path(folder)
    train_ids = list(train_ids)
    model = fit_classifier(features.loc[train_ids].to_numpy(np.float32),
                           labels.loc[train_ids].to_numpy(), kind=kind, seed=seed, n_jobs=n_jobs)
    model.save_model(str(folder / FOREST_NAME))
    np.save(folder / SEGMENTS_NAME, np.ascontiguousarray(segments, dtype=np.int32))
    position = {image_id: row for row, image_id in enumerate(image_ids)}
    goods = [position[i] for i in train_ids if i in position and int(labels.loc[i]) == 0]
    if not goods:
        raise DefectflowError(f"the fusion's training split has no real good image to scale "
                              f"the anomaly maps with (category {category!r})")
    lows, highs = [], []
    for maps_of in maps:
        good_maps = np.asarray(maps_of[goods], dtype=np.float32)
        lows.append(float(good_maps.mean()))
        highs.append(float(np.quantile(good_maps.max(axis=(1, 2)), 0.99)))
    y = labels.loc[train_ids].to_numpy().astype(int)
    config = FusionConfig(
        category=category, detectors=tuple(detectors),
        map_size=int(np.shape(maps[0])[-1]), n_segments=count_segments(segments),
        threshold=FUSION_THRESHOLD, map_low=tuple(lows), map_high=tuple(highs),
        classifier=kind, train_seed=int(seed), n_train_good=int((y == 0).sum()),
        n_train_bad=int((y == 1).sum()))
    # Overlay colour scale as the detectors': the 0.99 quantile of the fused maps' peaks.
    peaks = fused_map(maps, config).max(axis=(1, 2))
    config = dataclasses.replace(config, map_vmax=float(np.quantile(peaks, 0.99)))
    config.save(folder / FUSION_CONFIG_NAME)
    return config
