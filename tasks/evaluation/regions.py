"""Localization per defect region: AUPRO as in MVTec AD, saturated sPRO as in MVTec LOCO AD.

Both are computed exactly from sorted scores (no threshold sampling unless asked).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import auc

from ..errors import DefectflowError
from .metrics import check_maps


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
    each mask. NaN in a map marks a pixel that was not inspected (outside every
    window of a stitched map): it counts neither as normal nor in its region, and
    a region with no inspected pixel is left out. For every threshold:

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
    check_maps(masks, maps, allow_nan=True)
    _check_curve_arguments(fpr_limit, num_thresholds)
    dtype = _score_dtype(maps)
    eight_connected = np.ones((3, 3), dtype=bool)

    normal_masks, positives, inverse_areas = [], [], []
    num_regions = 0
    for mask, anomaly_map in zip(masks, maps):
        anomaly_map = np.asarray(anomaly_map)
        inspected = ~np.isnan(anomaly_map)
        if mask is None:
            normal_masks.append(None if inspected.all() else inspected)
            continue
        mask = np.asarray(mask, dtype=bool)
        normal_masks.append(~mask & inspected)
        # Regions are labelled on the whole mask, so an uncovered strip does not split a
        # defect in two; each counts its inspected pixels only.
        region_of_pixel, count = ndimage.label(mask, structure=eight_connected)
        scored = mask & inspected
        if count and scored.any():
            region_ids = region_of_pixel[scored]  # same row-major order as anomaly_map[scored]
            areas = np.bincount(region_ids)
            positives.append(anomaly_map[scored].astype(dtype, copy=False))
            inverse_areas.append(1.0 / areas[region_ids])
            num_regions += int(np.count_nonzero(areas))

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
    check_maps([None] * len(maps), maps)
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
