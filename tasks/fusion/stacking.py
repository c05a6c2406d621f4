"""Fusions simpler than the forest, on the detectors' own image scores.

The forest sees K*M*4 + M segment statistics and learns from some 20 labelled defects; when
one detector already ranks the images well, those many features mostly add noise. The
alternatives here have one number per detector:

- ``Stacker``: logistic regression on each detector's image score, standardized by the
  training split's good images (so a detector's units, 0-0.6 or 0-375, do not matter),
  strongly regularized, on the detectors that separate the training split better than
  chance (pure-noise detectors are left out);
- a single detector: its own image score as is (what its own run reports).

Columns of the detectors' own image scores are named ``"<detector>.score"``
(``score_columns``), beside the segment features' ``"<detector>.image_score"`` (the map
maximum, SegAD's image-level feature).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import DefectflowError

SCORE_SUFFIX = ".score"
# A detector whose training goods all score alike would divide by ~0: floor its spread.
_MIN_STD = 1e-12
# The stacker's inverse L2 strength: with ~20 defects, weak regularization chases their
# noise (Magnetic Tile, 10 seeds, `bench/fusion.py --variants stacker-c1,stacker-c0.1,stacker`:
# see the README's fusion measurements).
STACKER_C = 0.01
_Z_99 = 2.326  # one-sided normal quantile of p = 0.01


def score_columns(detectors: Sequence[str]) -> list[str]:
    """The columns holding each detector's own image score, in ``detectors``' order."""
    return [f"{d}{SCORE_SUFFIX}" for d in detectors]


def score_frame(scores_per_detector: Sequence[np.ndarray], image_ids: Sequence[str],
                detectors: Sequence[str]) -> pd.DataFrame:
    """The detectors' own image scores as a frame indexed by image id (``score_columns``)."""
    if len(scores_per_detector) != len(detectors):
        raise DefectflowError(f"{len(detectors)} detector names for {len(scores_per_detector)} "
                              "sets of image scores")
    data = {c: np.asarray(s, dtype=np.float64)
            for c, s in zip(score_columns(detectors), scores_per_detector)}
    if any(len(v) != len(image_ids) for v in data.values()):
        raise DefectflowError(f"image scores do not match the {len(image_ids)} image ids")
    return pd.DataFrame(data, index=pd.Index(list(image_ids), name="image_id"))


@dataclass(frozen=True)
class Stacker:
    """Logistic regression on goods-standardized detector scores; ``decision`` is its margin
    (log-odds with balanced class weights: 0 is its own decision boundary)."""

    columns: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float

    def decision(self, frame: pd.DataFrame) -> np.ndarray:
        z = (frame.loc[:, list(self.columns)].to_numpy(np.float64) - np.asarray(self.mean)) \
            / np.asarray(self.std)
        return z @ np.asarray(self.coef) + self.intercept


def fit_stacker(frame: pd.DataFrame, labels: np.ndarray, columns: Sequence[str],
                c: float = STACKER_C) -> Stacker:
    """A ``Stacker`` on ``columns`` of ``frame`` (training rows) with labels 0/1.

    Only the columns whose training AUROC is above chance at one-sided p < 0.01 (the
    Mann-Whitney normal approximation) enter; the best column when none is. Standardized
    by the training goods' mean and standard deviation; strongly L2-regularized (``c``):
    the weights then follow each detector's separation of defects from goods rather than
    the noise of ~20 labelled defects; classes weighted as the forest's.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels).astype(int)
    n_bad, n_good = int(labels.sum()), int((labels == 0).sum())
    if n_good == 0 or n_bad == 0:
        raise DefectflowError("the stacker needs good (0) and defective (1) training images")
    auroc = {col: roc_auc_score(labels, frame[col].to_numpy(np.float64)) for col in columns}
    chance_se = np.sqrt((n_good + n_bad + 1) / (12 * n_good * n_bad))
    kept = [col for col in columns if auroc[col] > 0.5 + _Z_99 * chance_se] \
        or [max(columns, key=lambda col: auroc[col])]
    x = frame.loc[:, kept].to_numpy(np.float64)
    goods = x[labels == 0]
    mean = goods.mean(axis=0)
    std = np.maximum(goods.std(axis=0), _MIN_STD)
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=1000)
    model.fit((x - mean) / std, labels)
    return Stacker(tuple(kept), tuple(mean.tolist()), tuple(std.tolist()),
                   tuple(model.coef_[0].tolist()), float(model.intercept_[0]))
