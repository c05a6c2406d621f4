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
from .choice import FOREST, STACKER, Choice, FittedFusion
from .features import feature_names
from .segments import count_segments
from .stacking import Stacker, score_columns

FUSION_CONFIG_NAME = "fusion.json"
FOREST_NAME = "forest.json"        # XGBoost save_model JSON
SEGMENTS_NAME = "segments.npy"
FUSION_CONFIG_VERSION = 2
FUSION_THRESHOLD = 0.0
# Why margin 0: the forest is fitted with scale_pos_weight = good/defective, so both classes
# weigh the same and margin 0 (weighted log-odds 0) is the forest's own decision boundary,
# with equal costs and no test label involved. A quantile of the training goods' margins
# would be in-sample: the forest has seen those goods, their margins are overconfident and
# the threshold would land too low (false alarms on new good images).
FUSION_THRESHOLD_RULE = "margin 0: the forest's decision boundary (scale_pos_weight-balanced)"
STACKER_THRESHOLD_RULE = "margin 0: the stacker's decision boundary (class-balanced)"
# A detector chosen alone keeps the detectors' own rule, on the fusion's held-out goods.
DETECTOR_THRESHOLD_QUANTILE = 0.99
DETECTOR_THRESHOLD_RULE = "0.99 quantile of the held-out good images' scores"


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
    # What serves: "forest", "stacker" or one detector's name (the auto setting's choice for
    # the first seed). The forest's columns ("": SegAD's features, ``feature_names``), the
    # stacker's logistic regression on goods-standardized detector image scores.
    model: str = FOREST
    forest_columns: tuple[str, ...] = ()
    stacker_columns: tuple[str, ...] = ()
    stacker_mean: tuple[float, ...] = ()
    stacker_std: tuple[float, ...] = ()
    stacker_coef: tuple[float, ...] = ()
    stacker_intercept: float = 0.0
    choice_reason: str = ""
    train_seed: int = 0
    n_train_good: int = 0
    n_train_bad: int = 0
    threshold_rule: str = FUSION_THRESHOLD_RULE
    version: int = FUSION_CONFIG_VERSION

    _VERSION = FUSION_CONFIG_VERSION
    _WHAT = "fusion settings"
    _TUPLES = ("detectors", "map_low", "map_high", "forest_columns", "stacker_columns",
               "stacker_mean", "stacker_std", "stacker_coef")

    @classmethod
    def _upgrade(cls, data: dict) -> dict:
        """Version 1 always served SegAD's forest on its own features (the defaults)."""
        return {**data, "version": 2} if data.get("version") == 1 else data

    def fitted(self, forest=None) -> FittedFusion:
        """The served fusion as ``FittedFusion`` (``forest``: the loaded forest, if it is one):
        its ``score`` takes a frame of SegAD's features plus the detectors' own scores."""
        if self.model == FOREST:
            columns = self.forest_columns or tuple(feature_names(self.n_segments,
                                                                 self.detectors))
            return FittedFusion(Choice(FOREST), forest_columns=columns, forest=forest)
        if self.model == STACKER:
            return FittedFusion(Choice(STACKER), stacker=Stacker(
                self.stacker_columns, self.stacker_mean, self.stacker_std, self.stacker_coef,
                self.stacker_intercept))
        if self.model not in self.detectors:
            raise DefectflowError(f"fusion model {self.model!r} is neither the forest, the "
                                  f"stacker nor one of the detectors {list(self.detectors)}")
        return FittedFusion(Choice(self.model),
                            score_column=score_columns([self.model])[0])


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


def write_deployable_fusion(folder: str | Path, fitted: FittedFusion, features: pd.DataFrame,
                            labels: pd.Series, train_ids: Sequence[str], seed: int,
                            maps: Sequence[np.ndarray], image_ids: Sequence[str],
                            segments: np.ndarray, detectors: Sequence[str],
                            category: str, kind: str = "brf") -> FusionConfig:
    """Write the one fusion to serve, with its settings, into ``folder``.

    ``fitted`` is the first seed's fusion as the protocol fitted it on ``train_ids`` (held-out
    goods plus its labelled or synthetic defects), so it is the model behind that seed's
    evaluation scores: a forest (``forest.json``), the stacker's weights or one detector.
    ``maps``: each detector's (n, S, S) maps of the real images ``image_ids``; the training
    goods among them set the per-detector map scale. Writes ``forest.json`` (a forest only),
    ``segments.npy`` and ``fusion.json``.
    """
    folder = Path(folder)
    train_ids = list(train_ids)
    if fitted.forest is not None:
        fitted.forest.save_model(str(folder / FOREST_NAME))
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
    model = fitted.choice.chosen
    threshold, rule, stacker = FUSION_THRESHOLD, FUSION_THRESHOLD_RULE, {}
    if fitted.stacker is not None:
        rule = STACKER_THRESHOLD_RULE
        stacker = dict(stacker_columns=fitted.stacker.columns, stacker_mean=fitted.stacker.mean,
                       stacker_std=fitted.stacker.std, stacker_coef=fitted.stacker.coef,
                       stacker_intercept=fitted.stacker.intercept)
    elif fitted.forest is None:  # one detector alone
        good_ids = [i for i in train_ids if i in position and int(labels.loc[i]) == 0]
        threshold = float(np.quantile(features.loc[good_ids, fitted.score_column],
                                      DETECTOR_THRESHOLD_QUANTILE))
        rule = DETECTOR_THRESHOLD_RULE
    config = FusionConfig(
        category=category, detectors=tuple(detectors),
        map_size=int(np.shape(maps[0])[-1]), n_segments=count_segments(segments),
        threshold=threshold, map_low=tuple(lows), map_high=tuple(highs),
        classifier=kind, model=model,
        forest_columns=tuple(fitted.forest_columns), choice_reason=fitted.choice.reason,
        train_seed=int(seed), n_train_good=int((y == 0).sum()),
        n_train_bad=int((y == 1).sum()), threshold_rule=rule, **stacker)
    # Overlay colour scale as the detectors': the 0.99 quantile of the fused maps' peaks.
    peaks = fused_map(maps, config).max(axis=(1, 2))
    config = dataclasses.replace(config, map_vmax=float(np.quantile(peaks, 0.99)))
    config.save(folder / FUSION_CONFIG_NAME)
    return config

