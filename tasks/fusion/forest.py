"""SegAD's final classifier: an XGBoost boosted random forest (or plain forest / boosted
trees) on the fusion features, fitted with balanced classes and scored by its raw margin."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import DefectflowError

if TYPE_CHECKING:  # xgboost is imported where a classifier is built, not at import time
    from xgboost import XGBClassifier

CLASSIFIER_KINDS = ("brf", "rf", "bt")


def make_classifier(kind: str = "brf", scale_pos_weight: float = 1.0, seed: int = 0,
                    n_jobs: int = 2) -> "XGBClassifier":
    """SegAD's final classifier (appendix A.1), untrained.

    - ``"brf"`` boosted random forest: 10 rounds x 200 parallel trees,
      learning rate 0.3, ``binary:logitraw``, max depth 5, colsample_bytree =
      colsample_bynode = subsample = 0.6, L1 (reg_alpha) 1;
    - ``"rf"`` random forest: as brf with learning rate 1.0, 1 round of 2000 trees;
    - ``"bt"`` boosted trees: as brf with 2000 rounds of 1 tree and the
      default colsample_bytree (1).

    ``scale_pos_weight`` = good / defective count of the training set
    (``fit_classifier`` computes it). Histogram tree method. Score with
    ``margin_scores`` (the raw margin; higher = more defective).

    Under CPU oversubscription (other processes busy on the same cores)
    ``n_jobs`` > 1 can be several times slower than 1: OpenMP threads spin
    while waiting for each other.
    """
    from xgboost import XGBClassifier

    settings: dict = dict(n_estimators=10, num_parallel_tree=200, learning_rate=0.3,
                          objective="binary:logitraw", max_depth=5, colsample_bytree=0.6,
                          colsample_bynode=0.6, subsample=0.6, reg_alpha=1.0)
    if kind == "rf":
        settings.update(learning_rate=1.0, n_estimators=1, num_parallel_tree=2000)
    elif kind == "bt":
        settings.update(n_estimators=2000, num_parallel_tree=1)
        del settings["colsample_bytree"]
    elif kind != "brf":
        raise DefectflowError(f"unknown fusion classifier {kind!r} (use one of {CLASSIFIER_KINDS})")
    return XGBClassifier(**settings, scale_pos_weight=float(scale_pos_weight), n_jobs=n_jobs,
                         random_state=seed, tree_method="hist")


def fit_classifier(features: np.ndarray, labels: np.ndarray, kind: str = "brf", seed: int = 0,
                   n_jobs: int = 2) -> "XGBClassifier":
    """A ``make_classifier`` fitted on (features, labels 0/1), weighting defects by good/bad."""
    labels = np.asarray(labels).astype(int)
    n_bad = int((labels == 1).sum())
    n_good = int((labels == 0).sum())
    if n_bad == 0 or n_good == 0 or n_bad + n_good != len(labels):
        raise DefectflowError(f"the fusion needs good (0) and defective (1) training images "
                              f"(got {n_good} good, {n_bad} defective, labels {np.unique(labels)})")
    model = make_classifier(kind, scale_pos_weight=n_good / n_bad, seed=seed, n_jobs=n_jobs)
    return model.fit(np.asarray(features, dtype=np.float32), labels)


def margin_scores(model: "XGBClassifier", features: np.ndarray) -> np.ndarray:
    """Fusion scores: the raw margin (log-odds scale), higher = more defective."""
    return np.asarray(model.predict(np.asarray(features, dtype=np.float32), output_margin=True),
                      dtype=np.float64)
