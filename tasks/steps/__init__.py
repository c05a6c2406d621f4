"""The pipeline's steps on by-reference data: what ``flows/pipeline.py`` wraps as Prefect tasks.

Each step reads its inputs from small descriptors (``cache.Ref``), calls the plain
functions of the other modules, writes its output once under a content-addressed key
(the hash of its inputs' keys and the parameters that matter, ``common.step_key``) and
returns a small descriptor. Calling a step again with the same inputs finds the output
and returns at once, with or without Prefect's cache in front of it; such a call imports
neither scikit-learn nor matplotlib.

One module per stage, in the flow's order: ``prepare`` (scan, categorize, patches,
normalization, features), ``detect`` (train, score), ``evaluate``, ``fuse`` (SegAD fusion
and its synthetic defects), ``plots``.
"""

from .common import STEP_VERSION
from .detect import labelled_defects, score_step, train_step
from .evaluate import evaluate_step
from .fuse import fusion_step, synthetic_scores_step, synthetic_step
from .plots import image_embeddings, plots_step
from .prepare import (
    ScanRefs,
    categorize_step,
    features_step,
    normalization_step,
    patches_step,
    scan_step,
    source_fingerprint,
)

__all__ = [
    "STEP_VERSION", "ScanRefs", "categorize_step", "evaluate_step", "features_step",
    "fusion_step", "image_embeddings", "labelled_defects", "normalization_step",
    "patches_step", "plots_step", "scan_step", "score_step", "source_fingerprint",
    "synthetic_scores_step", "synthetic_step", "train_step",
]
