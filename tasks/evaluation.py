"""Evaluation of a detector's scores: metrics, the decision threshold, tables and plots.

Everything takes plain numpy data (labels 0 = good, 1 = defective; higher score =
more anomalous) and returns plain dicts of Python floats/ints, DataFrames, or the
paths of written PNG files, so the tracking layer can log them as they are.
Plots draw on standalone matplotlib figures with the Agg canvas: no pyplot global
state, no display needed, safe in worker threads.

Localization is measured per region as well as per pixel: AUPRO as in MVTec AD,
saturated sPRO as in MVTec LOCO AD, both computed exactly from sorted scores.
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
from scipy import ndimage
from sklearn.manifold import TSNE
from sklearn.metrics import (
    accuracy_score,
    auc,
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
from .images import read_mask


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
    _check_maps(masks, maps)
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


def aupro(
    masks: Sequence[np.ndarray | None],
    maps: Sequence[np.ndarray],
    fpr_limit: float = 0.3,
    num_thresholds: int | None = None,
) -> float:
    """Area under the per-region-overlap (PRO) curve up to ``fpr_limit``, scaled to [0, 1].

    The localization metric of MVTec AD. Pixel AUROC is dominated by large
    defects (every pixel counts once); PRO makes each connected defect region
    count once, so a missed small scratch costs as much as a missed large stain.

    ``masks[i]`` is a bool H x W mask or None for a good image (all normal);
    ``maps[i]`` the anomaly map of the same size. A pixel is flagged at threshold
    ``t`` when its score is ``>= t``. Regions are the 8-connected components of
    each mask. For every threshold:

    - PRO(t) = mean over all regions of (flagged pixels of the region / its area);
    - FPR(t) = flagged normal pixels / all normal pixels (of all images).

    The curve runs from (0, 0) (nothing flagged) through one point per distinct
    score, from the highest down; pixels with equal scores switch together, so a
    tie is one straight (possibly diagonal) segment, never a staircase in an
    arbitrary order. The area under it from FPR 0 to ``fpr_limit`` (trapezoids,
    the curve interpolated linearly at exactly ``fpr_limit``) is divided by
    ``fpr_limit``: a perfect map gives 1.0, a constant map ``fpr_limit / 2``.

    The curve is exact, not sampled: PRO(t) is a sum over the flagged region
    pixels of 1 / (regions x area of the pixel's region), FPR(t) a count of
    flagged normal pixels, so one in-place sort of the normal scores and one of
    the region scores give the curve at every distinct score (see
    :func:`_overlap_curve`). No subsampling is needed: 500 maps of 224 x 224 take
    about a second and one float32 copy of the normal pixels (~100 MB) beside
    the maps. ``num_thresholds`` instead evaluates the curve only at that many
    thresholds spread evenly between the lowest and highest score, as binned
    implementations do (coarser; for comparing with their numbers). NaN when
    there is no defect region or no normal pixel.
    """
    _check_maps(masks, maps)
    _check_curve_arguments(fpr_limit, num_thresholds)
    dtype = _score_dtype(maps)
    eight_connected = np.ones((3, 3), dtype=bool)

    normal_masks, positives, inverse_areas = [], [], []
    num_regions = 0
    for mask, anomaly_map in zip(masks, maps):
        if mask is None:
            normal_masks.append(None)
            continue
        mask = np.asarray(mask, dtype=bool)
        normal_masks.append(~mask)
        region_of_pixel, count = ndimage.label(mask, structure=eight_connected)
        if count:
            region_ids = region_of_pixel[mask]  # same row-major order as anomaly_map[mask]
            positives.append(np.asarray(anomaly_map)[mask].astype(dtype, copy=False))
            inverse_areas.append(1.0 / np.bincount(region_ids)[region_ids])
            num_regions += count

    normals = _normal_scores(maps, normal_masks, dtype)
    if num_regions == 0 or normals.size == 0:
        return math.nan
    fpr, pro = _overlap_curve(
        normals,
        np.concatenate(positives),
        np.concatenate(inverse_areas) / num_regions,
        num_thresholds,
    )
    return _area_up_to(fpr, pro, fpr_limit)


def spro(
    masks_per_image: Sequence[Sequence[np.ndarray] | None],
    saturation_thresholds: Sequence[Sequence[float] | None],
    maps: Sequence[np.ndarray],
    fpr_limit: float = 0.05,
    num_thresholds: int | None = None,
) -> float:
    """Area under the saturated-PRO (sPRO) curve up to ``fpr_limit``, scaled to [0, 1].

    The localization metric of MVTec LOCO AD, where a defect (say, a missing
    pushpin) may sit anywhere in a larger annotated area: flagging "enough" of
    it should count as fully found. ``masks_per_image[i]`` holds one bool mask
    per defect of image ``i`` (LOCO's separate mask files; an empty list or None
    for a good image), ``saturation_thresholds[i]`` one pixel count per defect.
    A defect's overlap at threshold ``t`` is ``min(1, flagged pixels of the defect
    / s)``, with ``s`` = min(saturation threshold, defect area), as in the LOCO
    reference code, so every defect can reach 1. sPRO(t) is the mean over all
    defects; with ``s`` = area it is PRO with one region per mask. A defect is one
    mask however many connected pieces it has. FPR counts the flagged pixels
    outside every defect mask, over all images.

    Curve, ties, integration, normalization and ``num_thresholds`` are as in
    :func:`aupro`; it stays exact because, taken in descending score order, the
    r-th pixel of a defect raises its overlap by min(1, r/s) - min(1, (r-1)/s).
    NaN when there is no defect or no normal pixel.
    """
    if not len(masks_per_image) == len(saturation_thresholds) == len(maps):
        raise DefectflowError(
            f"{len(masks_per_image)} mask lists, {len(saturation_thresholds)} saturation "
            f"lists and {len(maps)} anomaly maps: need one of each per image"
        )
    _check_maps([None] * len(maps), maps)
    _check_curve_arguments(fpr_limit, num_thresholds)
    dtype = _score_dtype(maps)

    normal_masks, positives, steps = [], [], []
    for index, (defect_masks, saturations, anomaly_map) in enumerate(
        zip(masks_per_image, saturation_thresholds, maps)
    ):
        defect_masks, saturations = list(defect_masks or []), list(saturations or [])
        anomaly_map = np.asarray(anomaly_map)
        if len(defect_masks) != len(saturations):
            raise DefectflowError(
                f"image #{index} has {len(defect_masks)} defect masks but "
                f"{len(saturations)} saturation thresholds"
            )
        anywhere = np.zeros(anomaly_map.shape, dtype=bool)
        for number, (mask, saturation) in enumerate(zip(defect_masks, saturations)):
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != anomaly_map.shape:
                raise DefectflowError(
                    f"defect mask #{number} of image #{index} has shape {mask.shape}, "
                    f"its anomaly map {anomaly_map.shape}"
                )
            area = int(mask.sum())
            if area == 0:
                raise DefectflowError(f"defect mask #{number} of image #{index} is empty")
            if not (math.isfinite(saturation) and saturation > 0):
                raise DefectflowError(
                    f"saturation threshold {saturation} of defect #{number} of image "
                    f"#{index} is not a positive number of pixels"
                )
            saturation = min(float(saturation), area)
            scores = anomaly_map[mask].astype(dtype, copy=False)
            rank = np.empty(area)
            rank[np.argsort(scores, kind="stable")[::-1]] = np.arange(1, area + 1)
            positives.append(scores)
            steps.append(
                np.minimum(1.0, rank / saturation) - np.minimum(1.0, (rank - 1) / saturation)
            )
            anywhere |= mask
        normal_masks.append(~anywhere if defect_masks else None)

    normals = _normal_scores(maps, normal_masks, dtype)
    if not positives or normals.size == 0:
        return math.nan
    fpr, overlap = _overlap_curve(
        normals,
        np.concatenate(positives),
        np.concatenate(steps) / len(positives),  # one entry per defect: the mean over defects
        num_thresholds,
    )
    return _area_up_to(fpr, overlap, fpr_limit)


def fpr_at_tpr(labels: np.ndarray, scores: np.ndarray, tpr: float = 0.95) -> float:
    """Image-level false positive rate at the true positive rate ``tpr``.

    "How many good parts are rejected to catch 95 % of the defective ones." Read
    off the ROC curve (all its points), linearly interpolated between the two
    points around ``tpr`` (the rate that randomizing between those two thresholds
    achieves); where the curve reaches ``tpr`` exactly, the lowest FPR that does.
    NaN unless both classes occur.
    """
    labels, scores = _labels_and_scores(labels, scores)
    if not 0.0 < tpr <= 1.0:
        raise DefectflowError(f"true positive rate {tpr} is not in (0, 1]")
    if not (labels.any() and (~labels).any()):
        return math.nan
    fprs, tprs, _ = roc_curve(labels, scores, drop_intermediate=False)
    end = int(np.searchsorted(tprs, tpr, side="left"))  # first point reaching tpr; tprs[0] = 0
    fraction = (tpr - tprs[end - 1]) / (tprs[end] - tprs[end - 1])
    return float(fprs[end - 1] + fraction * (fprs[end] - fprs[end - 1]))


def mask_iou(
    masks: Sequence[np.ndarray | None], maps: Sequence[np.ndarray], threshold: float
) -> float:
    """Intersection over union of the maps thresholded at ``threshold`` (``>=``) with the masks.

    Pooled over all pixels of the images that have a mask (None entries are
    skipped), so it measures the segmentation an operator would see at that
    threshold. NaN when no image has a mask or neither masks nor predictions
    contain a pixel.
    """
    _check_maps(masks, maps)
    intersection = union = 0
    for mask, anomaly_map in zip(masks, maps):
        if mask is None:
            continue
        mask = np.asarray(mask, dtype=bool)
        flagged = np.asarray(anomaly_map) >= threshold
        intersection += int(np.count_nonzero(flagged & mask))
        union += int(np.count_nonzero(flagged | mask))
    return intersection / union if union else math.nan


def per_defect_type_auroc(
    labels: np.ndarray, scores: np.ndarray, defect_types: Sequence[str]
) -> dict[str, float]:
    """Image AUROC of each defect type's images against all good images.

    A detector may catch cracks and miss discolouration; one pooled AUROC hides
    that. ``defect_types[i]`` names image ``i``'s type (ignored for good images).
    Keys are the types of the defective images, sorted; values are NaN when
    there is no good image.
    """
    labels, scores = _labels_and_scores(labels, scores)
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


# ------------------------------------------------------------------- ground truth


def merge_masks(
    mask_paths: Sequence[str | Path], expected_hw: tuple[int, int] | None = None
) -> np.ndarray:
    """One bool mask from several mask files of the same image (pixel-wise OR).

    MVTec LOCO stores one mask file per defect of a test image; image-level and
    pixel metrics want their union. ``expected_hw`` is the image's (height,
    width); without it all masks must match the first. Errors name the file.
    """
    if not mask_paths:
        raise DefectflowError("no mask files to merge")
    merged: np.ndarray | None = None
    for path in mask_paths:
        size = expected_hw if expected_hw is not None or merged is None else merged.shape
        mask = read_mask(path, size)
        merged = mask if merged is None else merged | mask
    return merged


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


# The metric columns of a comparison table, in the order they are shown.
METRIC_COLUMNS = (
    "image_auroc",
    "image_aupr",
    "pixel_auroc",
    "pixel_aupr",
    "aupro",
    "spro",
    "f1_max",
    "fpr_at_95_tpr",
    "iou",
)


def comparison_table(rows: Sequence[dict]) -> pd.DataFrame:
    """One row per method (detectors and fusion alike), best ``image_auroc`` first.

    Each row is a dict with a ``method`` name and its metrics. Columns are
    ``method``, then the :data:`METRIC_COLUMNS` that any row has (missing values
    are NaN), then any other keys in the order first seen. Rows are sorted by
    ``image_auroc`` descending, NaN last, ties in the given order.
    """
    if not rows:
        raise DefectflowError("no methods to compare")
    for index, row in enumerate(rows):
        if "method" not in row:
            raise DefectflowError(f"comparison row #{index} has no 'method' name")
    methods = [row["method"] for row in rows]
    repeated = sorted({str(method) for method in methods if methods.count(method) > 1})
    if repeated:
        raise DefectflowError(f"methods listed more than once: {', '.join(repeated)}")

    table = pd.DataFrame(list(rows))
    metrics = [column for column in METRIC_COLUMNS if column in table.columns]
    others = [column for column in table.columns if column != "method" and column not in metrics]
    table = table[["method", *metrics, *others]]
    if "image_auroc" in table.columns:
        table = table.sort_values(
            "image_auroc", ascending=False, kind="stable", na_position="last"
        )
    return table.reset_index(drop=True)


def format_table(table: pd.DataFrame, digits: int = 3) -> str:
    """Fixed-width text of a table for the terminal.

    Floats get ``digits`` decimals, missing values show as ``-``; numeric
    columns are right-aligned, others left-aligned; two spaces between columns.
    """

    def cell(value: object) -> str:
        if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
            return "-"
        if isinstance(value, (float, np.floating)):
            return f"{value:.{digits}f}"
        return str(value)

    header = [str(column) for column in table.columns]
    body = [[cell(value) for value in row] for row in table.itertuples(index=False, name=None)]
    numeric = [pd.api.types.is_numeric_dtype(table[column]) for column in table.columns]
    widths = [max([len(header[j])] + [len(row[j]) for row in body]) for j in range(len(header))]

    def line(cells: list[str]) -> str:
        parts = [
            text.rjust(width) if right else text.ljust(width)
            for text, width, right in zip(cells, widths, numeric)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), rule, *(line(row) for row in body)])


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


def plot_curves(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str
) -> Path:
    """Write ROC (left) and precision-recall (right) curves of several methods as one PNG.

    ``curves`` maps a method name to its image ``(labels, scores)``; the legends
    carry each method's AUROC and average precision. A method whose labels hold
    one class only is listed without a curve.
    """
    if not curves:
        raise DefectflowError("no curves to plot", path)
    figure = Figure(figsize=(11, 5), dpi=100)
    FigureCanvasAgg(figure)
    roc_axes, pr_axes = figure.subplots(1, 2)
    defect_rates = set()
    for name, (labels, scores) in curves.items():
        labels, scores = _labels_and_scores(labels, scores)
        if not (labels.any() and (~labels).any()):
            roc_axes.plot([], [], " ", label=f"{name}: one class only")
            continue
        fpr, tpr, _ = roc_curve(labels, scores)
        (line,) = roc_axes.plot(
            fpr, tpr, lw=2, label=f"{name} (AUROC {roc_auc_score(labels, scores):.3f})"
        )
        precision, recall, _ = precision_recall_curve(labels, scores)
        # Steps, as average precision integrates it (no optimistic interpolation).
        pr_axes.plot(
            recall, precision, lw=2, color=line.get_color(), drawstyle="steps-post",
            label=f"{name} (AP {average_precision_score(labels, scores):.3f})",
        )
        defect_rates.add(float(labels.mean()))
    roc_axes.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="chance")
    if len(defect_rates) == 1:  # the chance level of PR is the defect rate, if all share it
        pr_axes.axhline(defect_rates.pop(), ls="--", color="grey", lw=1, label="chance")
    roc_axes.set(
        xlim=(0, 1), ylim=(0, 1.01), title="ROC",
        xlabel="false positive rate", ylabel="true positive rate",
    )
    pr_axes.set(
        xlim=(0, 1), ylim=(0, 1.01), title="precision-recall",
        xlabel="recall", ylabel="precision",
    )
    roc_axes.legend(loc="lower right", fontsize="small")
    pr_axes.legend(loc="lower left", fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    return _save(figure, path)


def plot_defect_type_bars(
    table: pd.DataFrame, path: str | Path, title: str = "image AUROC per defect type"
) -> Path:
    """Write grouped bars of AUROC per defect type (groups) and method (bars) as a PNG.

    ``table`` has the columns ``method``, ``defect_type`` and ``auroc``, one row
    per pair (see :func:`per_defect_type_auroc`). Methods and types keep their
    order of first appearance.
    """
    missing = {"method", "defect_type", "auroc"} - set(table.columns)
    if missing:
        raise DefectflowError(f"defect-type table lacks the columns {sorted(missing)}", path)
    if table.empty:
        raise DefectflowError("defect-type table is empty", path)
    if table.duplicated(["method", "defect_type"]).any():
        raise DefectflowError("defect-type table has a (method, defect_type) pair twice", path)
    methods = list(dict.fromkeys(table["method"]))
    types = list(dict.fromkeys(table["defect_type"]))
    grid = table.pivot(index="defect_type", columns="method", values="auroc")
    grid = grid.reindex(index=types, columns=methods)

    width_inches = max(7.0, 3.0 + 0.35 * len(types) * (len(methods) + 1))
    figure = Figure(figsize=(width_inches, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = np.arange(len(types))
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        axes.bar(
            positions - 0.4 + width * (j + 0.5), grid[method].to_numpy(dtype=float), width,
            label=str(method),
        )
    axes.axhline(0.5, ls="--", color="grey", lw=1, label="chance")
    axes.set_xticks(positions, [str(t) for t in types], rotation=30, ha="right")
    axes.set(ylim=(0, 1.05), ylabel="AUROC", title=title)
    # Outside the axes: inside, it would cover the bars it explains.
    axes.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    return _save(figure, path)


def plot_tsne(
    embeddings: np.ndarray,
    labels: Sequence,
    path: str | Path,
    seed: int = 0,
    title: str = "t-SNE of embeddings",
) -> Path:
    """Write a 2-D t-SNE scatter of ``embeddings`` (n x d), coloured by label, as a PNG.

    Shows whether defective images separate from good ones (or categories from
    each other) in a detector's feature space. Perplexity is min(30, (n - 1) / 3):
    the usual 30, lowered for small n, where t-SNE needs it below n and a
    neighbourhood of about a third of the points still shows structure.
    ``seed`` makes the layout reproducible. Meant for up to a few thousand points.
    """
    points = np.asarray(embeddings, dtype=np.float64)
    if points.ndim != 2 or points.shape[0] < 2:
        raise DefectflowError(
            f"t-SNE needs an n x d array with n >= 2, got shape {points.shape}", path
        )
    if not np.isfinite(points).all():
        raise DefectflowError("embeddings contain NaN or infinite values", path)
    labels = np.asarray(list(labels), dtype=object)
    if labels.size != points.shape[0]:
        raise DefectflowError(f"{labels.size} labels but {points.shape[0]} embeddings", path)

    n, d = points.shape
    layout = TSNE(
        n_components=2,
        perplexity=min(30.0, max(1.0, (n - 1) / 3)),
        init="pca" if min(n, d) >= 2 else "random",  # PCA start needs 2 dimensions
        # Exact gradients are faster than Barnes-Hut below ~1000 points (whose
        # tree overhead dominates there), and O(n^2) memory is small at that size.
        method="exact" if n <= 1000 else "barnes_hut",
        random_state=seed,
    ).fit_transform(points)

    figure = Figure(figsize=(6, 6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    classes = sorted(set(labels.tolist()), key=str)
    palette = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    for k, value in enumerate(classes):
        chosen = labels == value
        axes.scatter(
            layout[chosen, 0], layout[chosen, 1], s=14, color=palette(k % palette.N),
            label=f"{value} ({int(chosen.sum())})",
        )
    axes.set(title=title, xticks=[], yticks=[])
    axes.legend(fontsize="small", loc="best")
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


def _check_maps(masks: Sequence[np.ndarray | None], maps: Sequence[np.ndarray]) -> None:
    """Masks and anomaly maps pair up: as many of each, maps 2-D and finite, same sizes."""
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
        if not np.isfinite(anomaly_map).all():
            raise DefectflowError(f"anomaly map #{index} contains NaN or infinite values")


def _check_curve_arguments(fpr_limit: float, num_thresholds: int | None) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise DefectflowError(f"FPR limit {fpr_limit} is not in (0, 1]")
    if num_thresholds is not None and (
        int(num_thresholds) != num_thresholds or num_thresholds < 2
    ):
        raise DefectflowError(
            f"num_thresholds must be an integer >= 2 or None, got {num_thresholds}"
        )


def _score_dtype(maps: Sequence[np.ndarray]) -> np.dtype:
    """float32 unless a map needs float64: halves memory without creating ties."""
    return np.result_type(np.float32, *(np.asarray(anomaly_map).dtype for anomaly_map in maps))


def _normal_scores(
    maps: Sequence[np.ndarray], normal_masks: Sequence[np.ndarray | None], dtype: np.dtype
) -> np.ndarray:
    """The scores of all normal pixels (a whole map where its mask is None) in one array.

    Filled image by image into one preallocated array, so the peak memory is one
    copy of the normal pixels, not two.
    """
    sizes = [
        np.size(anomaly_map) if normal is None else int(np.count_nonzero(normal))
        for anomaly_map, normal in zip(maps, normal_masks)
    ]
    scores = np.empty(sum(sizes), dtype=dtype)
    start = 0
    for anomaly_map, normal, size in zip(maps, normal_masks, sizes):
        anomaly_map = np.asarray(anomaly_map)
        scores[start : start + size] = (
            anomaly_map.ravel() if normal is None else anomaly_map[normal]
        )
        start += size
    return scores


def _overlap_curve(
    normals: np.ndarray,
    positives: np.ndarray,
    steps: np.ndarray,
    num_thresholds: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The (FPR, overlap) curve of a (s)PRO metric, from (0, 0) to FPR 1, as the threshold falls.

    ``normals`` are the scores of all normal pixels (sorted here, in place);
    ``positives`` the scores of the defect pixels, each raising the overlap by
    its ``steps`` entry once flagged (score >= threshold).

    Exact (``num_thresholds`` None): between two adjacent distinct defect scores
    only normal pixels get flagged, a horizontal stretch, so two corners per
    distinct defect score p fix the whole curve: just above p (FPR(> p),
    overlap(> p)), and at p (FPR(>= p), overlap(>= p)); the straight segment
    between them is the tie at p, where all pixels scoring p switch together.
    The points left out are collinear, so neither the area nor the value
    interpolated at an FPR limit changes. Binned: one point per threshold.
    """
    normals.sort()
    order = np.argsort(positives, kind="stable")
    positives = positives[order]
    # above[i]: the overlap of the sorted defect pixels from index i up.
    above = np.append(np.cumsum(steps[order][::-1])[::-1], 0.0)

    def flagged_from(thresholds: np.ndarray, side: str) -> tuple[np.ndarray, np.ndarray]:
        """FPR and overlap when flagging scores >= (side "left") or > ("right") a threshold."""
        fpr = (normals.size - np.searchsorted(normals, thresholds, side)) / normals.size
        return fpr, above[np.searchsorted(positives, thresholds, side)]

    if num_thresholds is None:
        distinct = positives[np.append(True, positives[1:] != positives[:-1])][::-1]
        fpr_above, overlap_above = flagged_from(distinct, "right")
        fpr_at, overlap_at = flagged_from(distinct, "left")
        fpr = np.column_stack([fpr_above, fpr_at]).ravel()  # above p1, at p1, above p2, ...
        overlap = np.column_stack([overlap_above, overlap_at]).ravel()
    else:
        low, high = min(normals[0], positives[0]), max(normals[-1], positives[-1])
        thresholds = np.linspace(low, high, int(num_thresholds)).astype(normals.dtype)
        fpr, overlap = flagged_from(thresholds[::-1], "left")
    # Below the lowest defect score only normal pixels remain: flat out to FPR 1.
    return np.concatenate([[0.0], fpr, [1.0]]), np.concatenate([[0.0], overlap, overlap[-1:]])


def _area_up_to(fpr: np.ndarray, overlap: np.ndarray, fpr_limit: float) -> float:
    """Trapezoid area under the curve from FPR 0 to ``fpr_limit``, divided by ``fpr_limit``.

    The curve must start at FPR 0 and reach ``fpr_limit``; it is interpolated
    linearly at exactly ``fpr_limit``.
    """
    end = int(np.searchsorted(fpr, fpr_limit, side="left"))  # first point at or past the limit
    fraction = (fpr_limit - fpr[end - 1]) / (fpr[end] - fpr[end - 1])
    at_limit = overlap[end - 1] + fraction * (overlap[end] - overlap[end - 1])
    area = auc(np.append(fpr[:end], fpr_limit), np.append(overlap[:end], at_limit))
    return float(area / fpr_limit)
