"""Per-segment statistics of several detectors' anomaly maps: the SegAD feature table.

Feature vector of one image, length ``K * M * 4 + M``, in this order::

    for m in detectors:            # detector-major
        for s in range(K):         # then segment
            q995, skew, kurt, mean # of detector m's map inside segment s
    image_score[m] for m in detectors   # the map maximum, unless given

``q995`` is ``np.quantile(values, 0.995)`` (linear interpolation, as SegAD's
code), ``skew``/``kurt`` are scipy's biased Fisher-Pearson skewness and
Fisher (excess) kurtosis, set to 0 where the segment's map is constant
(scipy gives NaN there); an empty segment gives four zeros. Column names
(``feature_names``) are ``"<detector>.seg<s>.<stat>"`` and
``"<detector>.image_score"``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..errors import DefectflowError
from .segments import count_segments

STATISTICS = ("q995", "skew", "kurt", "mean")
QUANTILE = 0.995
# Pixels per chunk of images x detectors in feature_matrix: bounds memory (float32 chunk
# plus float64 temporaries of one segment) to some hundred MB whatever n and S are.
_CHUNK_PIXELS = 1 << 23


def feature_names(k: int, detectors: Sequence[str]) -> list[str]:
    """Column names of ``feature_matrix``, in its order (see the module docstring)."""
    names = [f"{d}.seg{s}.{stat}" for d in detectors for s in range(k) for stat in STATISTICS]
    return names + [f"{d}.image_score" for d in detectors]


def segment_features(maps: Sequence[np.ndarray], segments: np.ndarray, k: int,
                     image_scores: Sequence[float] | None = None) -> np.ndarray:
    """Feature vector (float32, length ``k * M * 4 + M``) of one image's M anomaly maps."""
    stacked = [np.asarray(m)[None] for m in maps]
    scores = None if image_scores is None else [np.asarray([s]) for s in image_scores]
    return feature_matrix(stacked, segments, k=k, image_scores=scores)[0]


def feature_matrix(maps_per_detector: Sequence[np.ndarray], segments: np.ndarray,
                   k: int | None = None,
                   image_scores: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Features of n images, (n, K*M*4 + M) float32, rows in the maps' image order.

    ``maps_per_detector``: M arrays (n, S, S), the same images in the same
    order (memory-mapped float16 is fine: read chunk by chunk).
    ``segments``: one (S, S) id map for all images, or (n, S, S) per image.
    ``k``: the number of segments (default ``max id + 1``; pass the category's
    K when per-image masks may miss the last ids). ``image_scores``: M arrays
    (n,) that replace the map maxima as the last M features (e.g. PatchCore's
    reweighted image score).

    With one map for all images the pixels are grouped by segment once and
    each segment's statistics are taken over a chunk of images x detectors at
    a time; per-image maps regroup per image.
    """
    if len(maps_per_detector) == 0:
        raise DefectflowError("no anomaly maps given (need at least one detector)")
    shape = tuple(np.shape(maps_per_detector[0]))
    for m, maps in enumerate(maps_per_detector):
        if len(np.shape(maps)) != 3 or tuple(np.shape(maps)) != shape or shape[1] != shape[2]:
            raise DefectflowError(f"anomaly maps of detector #{m} have shape {np.shape(maps)}; "
                                  f"expected (n, S, S) like detector #0's {shape}")
    n, size = shape[0], shape[1]
    n_det = len(maps_per_detector)
    segments = np.asarray(segments)
    per_image = segments.ndim == 3
    if segments.shape[-2:] != (size, size) or (per_image and segments.shape[0] != n) \
            or segments.ndim not in (2, 3):
        raise DefectflowError(f"segments have shape {segments.shape}; expected ({size}, {size}) "
                              f"or ({n}, {size}, {size}) to match the anomaly maps")
    if not np.issubdtype(segments.dtype, np.integer):
        raise DefectflowError(f"segments have dtype {segments.dtype}; expected integer ids")
    k = count_segments(segments) if k is None else int(k)
    if segments.size and (segments.min() < 0 or segments.max() >= k):
        raise DefectflowError(f"segment ids must lie in 0..{k - 1} "
                              f"(found {segments.min()}..{segments.max()})")
    if image_scores is not None and (len(image_scores) != n_det
                                     or any(np.shape(s) != (n,) for s in image_scores)):
        raise DefectflowError(f"image_scores must be {n_det} arrays of shape ({n},)")

    stats = np.zeros((n, n_det, k, len(STATISTICS)), dtype=np.float64)
    peaks = np.zeros((n, n_det), dtype=np.float64)
    pixels = size * size
    if per_image:
        for i in range(n):
            order, bounds = _grouping(segments[i], k)
            grouped = _read_grouped(maps_per_detector, i, i + 1, order)[0]
            peaks[i] = grouped.max(axis=1)
            stats[i] = _segment_statistics(grouped, bounds, k)
    else:
        order, bounds = _grouping(segments, k)
        chunk = max(1, _CHUNK_PIXELS // (pixels * n_det))
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            grouped = _read_grouped(maps_per_detector, start, stop, order)
            peaks[start:stop] = grouped.max(axis=2)
            stats[start:stop] = _segment_statistics(
                grouped.reshape(-1, pixels), bounds, k).reshape(stop - start, n_det, k, -1)
    if image_scores is not None:
        peaks = np.stack([np.asarray(s, dtype=np.float64) for s in image_scores], axis=1)
    return np.concatenate([stats.reshape(n, -1), peaks], axis=1).astype(np.float32)


def feature_frame(maps_per_detector: Sequence[np.ndarray], segments: np.ndarray,
                  image_ids: Sequence[str], detectors: Sequence[str], k: int | None = None,
                  image_scores: Sequence[np.ndarray] | None = None) -> pd.DataFrame:
    """``feature_matrix`` as a DataFrame indexed by ``image_id`` with ``feature_names`` columns."""
    if len(detectors) != len(maps_per_detector):
        raise DefectflowError(f"{len(detectors)} detector names for "
                              f"{len(maps_per_detector)} sets of anomaly maps")
    k = count_segments(segments) if k is None else int(k)
    matrix = feature_matrix(maps_per_detector, segments, k=k, image_scores=image_scores)
    if len(image_ids) != len(matrix):
        raise DefectflowError(f"{len(image_ids)} image ids for {len(matrix)} anomaly maps")
    index = pd.Index(list(image_ids), name="image_id")
    return pd.DataFrame(matrix, index=index, columns=feature_names(k, detectors))


def _read_grouped(maps_per_detector: Sequence[np.ndarray], start: int, stop: int,
                  order: np.ndarray) -> np.ndarray:
    """Images start..stop-1 of every detector, float32 (images, M, S*S), pixels in ``order``.

    Gathering in the stored dtype and converting on assignment reads each
    (possibly memory-mapped float16) map once.
    """
    out = np.empty((stop - start, len(maps_per_detector), order.size), dtype=np.float32)
    for m, maps in enumerate(maps_per_detector):
        out[:, m] = np.asarray(maps[start:stop]).reshape(stop - start, -1)[:, order]
        if not np.isfinite(out[:, m]).all():
            raise DefectflowError(f"anomaly maps of detector #{m} contain NaN or infinite "
                                  f"values (images {start}..{stop - 1})")
    return out


def _grouping(segments: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel order that puts each segment's pixels together, and where each segment starts."""
    flat = segments.ravel()
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(k + 1))
    return order, bounds


def _segment_statistics(grouped: np.ndarray, bounds: np.ndarray, k: int) -> np.ndarray:
    """(rows, k, 4) q995, skew, kurt, mean of each row's float32 values in each segment;
    ``grouped`` holds segment s's pixels at columns bounds[s]..bounds[s+1]-1."""
    out = np.zeros((len(grouped), k, len(STATISTICS)), dtype=np.float64)
    # The values are float32: a spread at float32 rounding level counts as none (scipy's rule).
    eps = np.finfo(np.float32).eps
    for s in range(k):
        part = grouped[:, bounds[s]:bounds[s + 1]]
        count = part.shape[1]
        if count == 0:
            continue  # empty segment: four zeros, as SegAD
        # np.quantile's linear interpolation from one partition (several times faster):
        # after it, the next order statistic is the smallest value above position `low`.
        position = QUANTILE * (count - 1)
        low = int(position)
        top = np.partition(part, low, axis=1)
        v_low = top[:, low].astype(np.float64)
        v_high = top[:, low + 1:].min(axis=1).astype(np.float64) if low + 1 < count else v_low
        out[:, s, 0] = v_low + (v_high - v_low) * (position - low)
        mean = part.mean(axis=1, dtype=np.float64)
        # Central moments from float32 deviations (accumulated in float64), 7x faster than
        # float64 temporaries; a constant segment gives deviations of exactly 0.
        dev = part - mean.astype(np.float32)[:, None]
        sq = dev * dev
        m2 = sq.mean(axis=1, dtype=np.float64)
        m3 = (sq * dev).mean(axis=1, dtype=np.float64)
        m4 = (sq * sq).mean(axis=1, dtype=np.float64)
        flat = m2 <= (eps * mean) ** 2
        safe = np.where(flat, 1.0, m2)
        out[:, s, 1] = np.where(flat, 0.0, m3 / safe ** 1.5)
        out[:, s, 2] = np.where(flat, 0.0, m4 / safe ** 2 - 3.0)
        out[:, s, 3] = mean
    return out
