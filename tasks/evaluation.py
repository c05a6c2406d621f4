"""Evaluation of a detector's scores: metrics, the decision threshold, tables and plots.

Everything takes plain numpy data (labels 0 = good, 1 = defective; higher score =
more anomalous) and returns plain dicts of Python floats/ints, DataFrames, or the
paths of written PNG files, so the tracking layer can log them as they are.
Plots draw on standalone matplotlib figures with the Agg canvas: no pyplot global
state, no display needed, safe in worker threads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
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

from .errors import DefectflowError


# ----------------------------------------------------------------------- threshold


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


# ------------------------------------------------------------------------ metrics


def image_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Image-level metrics: threshold-free ones, and the confusion at ``threshold``.

    A score ``>= threshold`` means "defective". ``image_auroc`` is NaN when the
    labels hold one class only, ``image_aupr``, ``f1_max`` and
    ``f1_max_threshold`` when there is no defective image. ``f1_max`` is the best
    F1 over all thresholds (an optimistic, label-tuned reference); the
    ``precision`` ... ``tp`` entries are what the chosen threshold really gives.
    """
    labels, scores = _labels_and_scores(labels, scores)
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
    if len(masks) != len(maps):
        raise DefectflowError(f"{len(masks)} masks but {len(maps)} anomaly maps")
    if not maps:
        raise DefectflowError("no anomaly maps to evaluate")
    if max_pixels < 1:
        raise DefectflowError(f"max_pixels must be positive, got {max_pixels}")
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


# ------------------------------------------------------------------------- tables


def score_table(
    image_ids: Sequence[str], labels: np.ndarray, scores: np.ndarray, threshold: float
) -> pd.DataFrame:
    """Per image: ``image_id``, ``label``, ``score``, ``prediction`` (score >= threshold)."""
    labels, scores = _labels_and_scores(labels, scores)
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


def pick_overlay_examples(labels: np.ndarray, scores: np.ndarray, n: int = 6) -> list[int]:
    """Indices of up to ``n`` informative test images, in a fixed order.

    Taken in turns from four rankings: highest-scoring defective (clear hits),
    lowest-scoring defective (likely misses), highest-scoring good (likely false
    alarms), lowest-scoring good (clean references); each turn takes the next
    image of its ranking not picked yet. Ties go to the lower index, so the
    choice is deterministic.
    """
    labels, scores = _labels_and_scores(labels, scores)

    def ranked(indices: np.ndarray, highest_first: bool) -> list[int]:
        keys = -scores[indices] if highest_first else scores[indices]
        return indices[np.lexsort((indices, keys))].tolist()  # last key sorts first

    defective, good = np.flatnonzero(labels), np.flatnonzero(~labels)
    rankings = [
        ranked(defective, True),
        ranked(defective, False),
        ranked(good, True),
        ranked(good, False),
    ]

    picked: list[int] = []
    positions = [0] * len(rankings)
    while len(picked) < min(n, len(labels)):
        for r, ranking in enumerate(rankings):
            while positions[r] < len(ranking) and ranking[positions[r]] in picked:
                positions[r] += 1
            if positions[r] < len(ranking) and len(picked) < n:
                picked.append(int(ranking[positions[r]]))
    return picked


# -------------------------------------------------------------------------- plots


def plot_roc(labels: np.ndarray, scores: np.ndarray, path: str | Path, title: str) -> Path:
    """Write the image-level ROC curve, with its AUROC in the legend, as a PNG at ``path``."""
    labels, scores = _labels_and_scores(labels, scores)
    figure = Figure(figsize=(5, 5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if labels.any() and (~labels).any():
        fpr, tpr, _ = roc_curve(labels, scores)
        axes.plot(fpr, tpr, lw=2, label=f"AUROC = {roc_auc_score(labels, scores):.3f}")
    else:
        axes.plot([], [], " ", label="AUROC undefined: one class only")
    axes.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="chance")
    axes.set(
        xlim=(0, 1), ylim=(0, 1.01), title=title,
        xlabel="false positive rate", ylabel="true positive rate",
    )
    axes.set_aspect("equal")
    axes.legend(loc="lower right")
    figure.tight_layout()
    return _save(figure, path)


def save_overlay(
    image_rgb_uint8: np.ndarray,
    mask_or_none: np.ndarray | None,
    anomaly_map: np.ndarray,
    path: str | Path,
    title: str,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Path:
    """Write one PNG with four panels: image, ground truth, anomaly map, overlay.

    ``anomaly_map`` may be smaller than the image; it is resized bilinearly to it.
    ``vmin``/``vmax`` fix the colour scale (pass the same ones for all images of a
    run so their colours compare); by default the map's own range is used. The
    overlay blends the map as a jet heatmap over the image and outlines the
    ground-truth defect in white.
    """
    image = np.asarray(image_rgb_uint8)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DefectflowError(
            f"overlay needs an RGB uint8 image, got {image.dtype} {image.shape}", path
        )
    height, width = image.shape[:2]
    if np.ndim(anomaly_map) != 2:
        raise DefectflowError(
            f"anomaly map has shape {np.shape(anomaly_map)}, expected H x W", path
        )
    if mask_or_none is None:
        mask = np.zeros((height, width), dtype=bool)
    else:
        mask = np.asarray(mask_or_none, dtype=bool)
    if mask.shape != (height, width):
        raise DefectflowError(
            f"mask shape {mask.shape} differs from the image's {(height, width)}", path
        )

    anomaly_map = cv2.resize(
        np.asarray(anomaly_map, dtype=np.float32), (width, height), interpolation=cv2.INTER_LINEAR
    )
    low = float(anomaly_map.min()) if vmin is None else float(vmin)
    high = float(anomaly_map.max()) if vmax is None else float(vmax)
    if high <= low:  # flat map: any non-empty range shows it as one colour
        high = low + 1e-12
    heat = colormaps["jet"](np.clip((anomaly_map - low) / (high - low), 0, 1))[..., :3]
    overlay = 0.5 * image / 255.0 + 0.5 * heat

    figure = Figure(figsize=(16, 4.4), dpi=100)
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, 4)
    panels[0].imshow(image)
    panels[0].set_title("image")
    panels[1].imshow(mask, cmap="gray", vmin=0, vmax=1)
    panels[1].set_title("ground truth" if mask_or_none is not None else "ground truth (none)")
    shown = panels[2].imshow(anomaly_map, cmap="jet", vmin=low, vmax=high)
    panels[2].set_title("anomaly map")
    figure.colorbar(shown, ax=panels[2], fraction=0.046, pad=0.04)
    panels[3].imshow(overlay)
    if mask.any():
        panels[3].contour(mask, levels=[0.5], colors="white", linewidths=1)
    panels[3].set_title("overlay")
    for panel in panels:
        panel.set_axis_off()
    figure.suptitle(title)
    figure.tight_layout()
    return _save(figure, path)


# ------------------------------------------------------------------------ helpers


def _labels_and_scores(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
