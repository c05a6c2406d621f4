"""SegAD fusion: per-segment statistics of several detectors' anomaly maps, fed to a boosted forest.

SegAD (Baitieva et al., 2024) turns the anomaly maps of M detectors into one
image score. Each image is cut into K segments (a fixed grid, superpixels of
a reference good image, or user-supplied part masks); for every detector and
segment four statistics of the map are taken, and an XGBoost "boosted random
forest" (BRF) trained on held-out good images plus a few labelled defective
ones learns which detector to trust where (e.g. ignore a detector's false
alarms on the background, weigh small peaks on a solder joint).

Two ways to train the fusion:

- supervised (SegAD's MVTec/VisA protocol): goods = every "val" image (good
  training images the detectors never saw), bads = ``n_defective`` defective
  test images drawn per seed; evaluated on the rest of the test split over
  10 seeds (``supervised_splits``, ``run_protocol``);
- one-class (appendix A.2): bads are synthetic defects pasted on held-out good
  images (``synthesize_defects``, ``one_class_split``).

Modules, in the order of the work: ``segments`` (the id maps), ``features``
(the per-segment statistics and their column order), ``forest`` (the
classifier), ``stacking`` and ``choice`` (the simpler fusions, and the
default ``auto`` setting that picks one per seed by cross-validation on the
training split), ``protocol`` (splits and the per-seed evaluation),
``synthetic`` (one-class defects), ``deploy`` (the one fusion fitted to serve
and its settings). Plain numpy/pandas/scikit-image/XGBoost: no Prefect, no MLflow.
"""

from .features import (QUANTILE, STATISTICS, feature_frame, feature_matrix, feature_names,
                       segment_features)
from .forest import CLASSIFIER_KINDS, fit_classifier, make_classifier, margin_scores
from .choice import FOREST, STACKER, Choice, FittedFusion, choose_and_fit
from .protocol import (ChoiceSettings, FusionSplit, ProtocolResult, assert_no_leakage,
                       fit_and_score, fit_fusion, one_class_split, run_protocol,
                       supervised_splits)
from .stacking import Stacker, fit_stacker, score_columns, score_frame
from .segments import count_segments, grid_segments, mask_segments, superpixel_segments
from .synthetic import DEFECT_KINDS, synthesize_defects

__all__ = [
    "CLASSIFIER_KINDS", "DEFECT_KINDS", "FOREST", "QUANTILE", "STACKER", "STATISTICS",
    "Choice", "ChoiceSettings", "FittedFusion", "Stacker", "choose_and_fit", "fit_fusion",
    "fit_stacker", "score_columns", "score_frame",
    "FusionSplit", "ProtocolResult", "assert_no_leakage", "count_segments", "feature_frame",
    "feature_matrix", "feature_names", "fit_and_score", "fit_classifier", "grid_segments",
    "make_classifier", "margin_scores", "mask_segments", "one_class_split", "run_protocol",
    "segment_features", "superpixel_segments", "supervised_splits", "synthesize_defects",
]
