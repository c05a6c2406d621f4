"""Image- and pixel-level metrics of a detector's scores, and the decision threshold.

Everything takes plain numpy data (labels 0 = good, 1 = defective; higher score =
more anomalous) and returns plain dicts of Python floats/ints or DataFrames, so the
tracking layer can log them as they are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from ..errors import DefectflowError


def threshold_from_good(scores_of_held_out_good: np.ndarray, quantile: float = 0.99) -> float:
    """The decision threshold: the ``quantile`` of the scores of held-out good images.

    The threshold is chosen without any test label on purpose. On a production
    line defects are rare and unlabeled, while good parts are plentiful; and a
    threshold tuned on the test labels would make the test metrics at that
    threshold optimistic. Good images held out from training (never seen by the
    detector's fit) show the score spread of normal parts, so a 0.99 quantile
    means "about 1 % of good parts raise a false alarm", an operating point that
    a plant can read and adjust.
    """
    scores = np.asarray(scores_of_held_out_good, dtype=np.float64).ravel()
    if scores.size == 0:
        raise DefectflowError(
            "no held-out good images to set the decision threshold from "
            "(hold out some good training images)"
        )
    if not np.isfinite(scores).all():
        raise DefectflowError("held-out good scores contain NaN or infinite values")
    if not 0.0 <= quantile <= 1.0:
        raise DefectflowError(f"threshold quantile {quantile} is not between 0 and 1")
    return float(np.quantile(scores, quantile))


def image_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Image-level metrics: threshold-free ones, and the confusion at ``threshold``.

    A score ``>= threshold`` means "defective". ``image_auroc`` is NaN when the
    labels hold one class only, ``image_aupr``, ``f1_max`` and
    ``f1_max_threshold`` when there is no defective image. ``f1_max`` is the best
    F1 over all thresholds (an optimistic reference, its threshold chosen with the test
    labels); the ``precision`` ... ``tp``, ``escape_rate`` (1 - recall) and
    ``false_alarm_rate`` (FP / good images) entries are what the chosen threshold gives.
    """
    labels, scores = labels_and_scores(labels, scores)
    has_positive, has_negative = bool(labels.any()), bool((~labels).any())

    metrics: dict[str, float] = {
        "image_auroc": (
            float(roc_auc_score(labels, scores)) if has_positive and has_negative else math.nan
        ),
        "image_aupr": float(average_precision_score(labels, scores)) if has_positive else math.nan,
        "f1_max": math.nan,
        "f1_max_threshold": math.nan,
    }
    if has_positive:
        precision, recall, thresholds = precision_recall_curve(labels, scores)
        # The curve's last point (precision 1, recall 0) has no threshold.
        precision, recall = precision[:-1], recall[:-1]
        denominator = precision + recall
        f1 = np.divide(
            2 * precision * recall,
            denominator,
            out=np.zeros_like(denominator),
            where=denominator > 0,
        )
        best = int(np.argmax(f1))
        metrics["f1_max"] = float(f1[best])
        metrics["f1_max_threshold"] = float(thresholds[best])

    predictions = scores >= threshold
    tn, fp, fn, tp = confusion_matrix(labels, predictions, labels=[False, True]).ravel()
    metrics.update(
        precision=float(precision_score(labels, predictions, zero_division=0)),
        recall=float(recall_score(labels, predictions, zero_division=0)),
        accuracy=float(accuracy_score(labels, predictions)),
        f1=float(f1_score(labels, predictions, zero_division=0)),
        tn=int(tn),
        fp=int(fp),
        fn=int(fn),
        tp=int(tp),
    )
    # What the deployed threshold means on the line: the share of defective parts that pass
    # as good, and the share of good parts flagged (NaN without defective / good images).
    metrics["escape_rate"] = float(fn / (tp + fn)) if has_positive else math.nan
    metrics["false_alarm_rate"] = float(fp / (fp + tn)) if has_negative else math.nan
    return metrics


def pixel_metrics(
    masks: Sequence[np.ndarray | None],
    maps: Sequence[np.ndarray],
    max_pixels: int = 5_000_000,
    seed: int = 0,
) -> dict[str, float]:
    """Pixel-level AUROC and AUPR of anomaly maps against ground-truth masks.

    ``masks[i]`` (bool, H x W, or None for an image without defects) and
    ``maps[i]`` (float, H x W) must have the same size; resize the maps first.
    All pixels of all given images count. When there are more than
    ``max_pixels``, a uniform random subsample of exactly ``max_pixels`` pixels
    (without replacement, seeded, so reruns agree) is used instead: ranking
    metrics over tens of millions of pixels are estimated to about 1e-3 by a
    few million, while sorting all of them costs minutes and gigabytes.
    ``pixel_auroc`` is NaN unless both classes occur, ``pixel_aupr`` without a
    defective pixel.
    """
    check_maps(masks, maps)
    if max_pixels < 1:
        raise DefectflowError(f"max_pixels must be positive, got {max_pixels}")

    sizes = np.array([np.size(anomaly_map) for anomaly_map in maps], dtype=np.int64)
    if sizes.sum() > max_pixels:
        # How many pixels each image contributes: drawing max_pixels balls from urns
        # of these sizes makes every pixel equally likely, whatever the image sizes.
        rng = np.random.default_rng(seed)
        counts = rng.multivariate_hypergeometric(sizes, max_pixels)
        picks = [
            np.sort(rng.choice(size, count, replace=False)) for size, count in zip(sizes, counts)
        ]
    else:
        picks = [slice(None)] * len(maps)

    def take(array: np.ndarray | None, pick: np.ndarray | slice, size: int, dtype: type):
        if array is None:  # an image without a mask has no defective pixel
            return np.zeros(size if isinstance(pick, slice) else len(pick), dtype=dtype)
        return np.asarray(array, dtype=dtype).ravel()[pick]

    truth = np.concatenate([take(m, p, n, bool) for m, p, n in zip(masks, picks, sizes)])
    values = np.concatenate([take(a, p, n, np.float32) for a, p, n in zip(maps, picks, sizes)])
    has_positive, has_negative = bool(truth.any()), bool((~truth).any())
    return {
        "pixel_auroc": (
            float(roc_auc_score(truth, values)) if has_positive and has_negative else math.nan
        ),
        "pixel_aupr": float(average_precision_score(truth, values)) if has_positive else math.nan,
    }


def per_defect_type_pixel_auroc(
    masks: Sequence[np.ndarray | None],
    maps: Sequence[np.ndarray],
    defect_types: Sequence[str],
    labels: Sequence[int],
    max_pixels: int = 1_000_000,
) -> dict[str, float]:
    """Pixel AUROC of each defect type: its images' pixels pooled with all good images'.

    The pooled pixel AUROC is weighted by defective area, so one type with large masks
    can set it alone (Magnetic Tile's ``uneven`` bands hold most defective pixels).
    ``labels[i]`` 0 marks a good image (all its pixels normal); keys are the defect types
    of the defective images, sorted; NaN where a type has no defective pixel.
    """
    if not len(masks) == len(maps) == len(defect_types) == len(labels):
        raise DefectflowError(
            f"{len(masks)} masks, {len(maps)} maps, {len(defect_types)} defect types and "
            f"{len(labels)} labels: one of each per image"
        )
    good = [index for index, label in enumerate(labels) if int(label) == 0]
    result: dict[str, float] = {}
    for defect_type in sorted({str(t) for t, label in zip(defect_types, labels) if int(label)}):
        chosen = good + [index for index, (t, label) in enumerate(zip(defect_types, labels))
                         if int(label) and str(t) == defect_type]
        result[defect_type] = pixel_metrics([masks[i] for i in chosen], [maps[i] for i in chosen],
                                            max_pixels=max_pixels)["pixel_auroc"]
    return result


def fpr_at_tpr(labels: np.ndarray, scores: np.ndarray, tpr: float = 0.95) -> float:
    """Image-level false positive rate at the true positive rate ``tpr``.

    "How many good parts are rejected to catch 95 % of the defective ones." Read
    off the ROC curve (all its points), linearly interpolated between the two
    points around ``tpr`` (the rate that randomizing between those two thresholds
    achieves); where the curve reaches ``tpr`` exactly, the lowest FPR that does.
    NaN unless both classes occur.
    """
    labels, scores = labels_and_scores(labels, scores)
    if not 0.0 < tpr <= 1.0:
        raise DefectflowError(f"true positive rate {tpr} is not in (0, 1]")
    if not (labels.any() and (~labels).any()):
        return math.nan
    fprs, tprs, _ = roc_curve(labels, scores, drop_intermediate=False)
    end = int(np.searchsorted(tprs, tpr, side="left"))  # first point reaching tpr; tprs[0] = 0
    fraction = (tpr - tprs[end - 1]) / (tprs[end] - tprs[end - 1])
    return float(fprs[end - 1] + fraction * (fprs[end] - fprs[end - 1]))


def per_defect_type_auroc(
    labels: np.ndarray, scores: np.ndarray, defect_types: Sequence[str]
) -> dict[str, float]:
    """Image AUROC of each defect type's images against all good images.

    A detector may catch cracks and miss discolouration; one pooled AUROC hides
    that. ``defect_types[i]`` names image ``i``'s type (ignored for good images).
    Keys are the types of the defective images, sorted; values are NaN when
    there is no good image.
    """
    labels, scores = labels_and_scores(labels, scores)
    types = np.array([str(defect_type) for defect_type in defect_types], dtype=object)
    if types.size != labels.size:
        raise DefectflowError(f"{types.size} defect types but {labels.size} scores")
    good = ~labels
    result: dict[str, float] = {}
    for defect_type in sorted(set(types[labels])):
        chosen = good | (labels & (types == defect_type))
        result[defect_type] = (
            float(roc_auc_score(labels[chosen], scores[chosen])) if good.any() else math.nan
        )
    return result


def score_table(
    image_ids: Sequence[str], labels: np.ndarray, scores: np.ndarray, threshold: float
) -> pd.DataFrame:
    """Per image: ``image_id``, ``label``, ``score``, ``prediction`` (score >= threshold)."""
    labels, scores = labels_and_scores(labels, scores)
    if len(image_ids) != len(labels):
        raise DefectflowError(f"{len(image_ids)} image ids but {len(labels)} scores")
    return pd.DataFrame(
        {
            "image_id": list(image_ids),
            "label": labels.astype(np.int64),
            "score": scores,
            "prediction": (scores >= threshold).astype(np.int64),
        }
    )


def image_scores(patch_scores: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """Image score = the maximum over its patches; one row per image."""
    scores = patch_scores.groupby("image_id", sort=True)["score"].max().rename("score")
    meta = manifest.set_index("image_id").loc[scores.index, ["split", "label", "defect_type"]]
    return meta.join(scores).reset_index()


def labels_and_scores(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated 1-D bool labels and float scores of the same, non-zero length."""
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.size != scores.size:
        raise DefectflowError(f"{labels.size} labels but {scores.size} scores")
    if labels.size == 0:
        raise DefectflowError("no scored images to evaluate")
    if not np.isin(labels, (0, 1)).all():
        found = sorted(set(labels.tolist()))[:5]
        raise DefectflowError(f"labels must be 0 (good) or 1 (defective), got {found}")
    if not np.isfinite(scores).all():
        raise DefectflowError("image scores contain NaN or infinite values")
    return labels.astype(bool), scores


def check_maps(masks: Sequence[np.ndarray | None], maps: Sequence[np.ndarray],
               allow_nan: bool = False) -> None:
    """Masks and anomaly maps pair up: as many of each, maps 2-D and finite (or NaN, where
    ``allow_nan``: pixels not inspected), same sizes."""
    if len(masks) != len(maps):
        raise DefectflowError(f"{len(masks)} masks but {len(maps)} anomaly maps")
    if not maps:
        raise DefectflowError("no anomaly maps to evaluate")
    for index, (mask, anomaly_map) in enumerate(zip(masks, maps)):
        if np.ndim(anomaly_map) != 2:
            raise DefectflowError(
                f"anomaly map #{index} has shape {np.shape(anomaly_map)}, expected H x W"
            )
        if mask is not None and np.shape(mask) != np.shape(anomaly_map):
            raise DefectflowError(
                f"mask #{index} has shape {np.shape(mask)}, its anomaly map "
                f"{np.shape(anomaly_map)}"
            )
        if not (np.isfinite(anomaly_map) | (allow_nan & np.isnan(anomaly_map))).all():
            raise DefectflowError(f"anomaly map #{index} contains NaN or infinite values")

