"""SegAD fusion: per-segment statistics of several detectors' anomaly maps, fed to a boosted forest.

SegAD (Baitieva et al., 2024) turns the anomaly maps of M detectors into one
image score. Each image is cut into K segments (a fixed grid, superpixels of
a reference good image, or user-supplied part masks); for every detector and
segment four statistics of the map are taken, and an XGBoost "boosted random
forest" (BRF) trained on held-out good images plus a few labelled defective
ones learns which detector to trust where (e.g. ignore a detector's false
alarms on the background, weigh small peaks on a solder joint).

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

Two ways to train the fusion:

- supervised (SegAD's MVTec/VisA protocol): goods = every "val" image (good
  training images the detectors never saw), bads = ``n_defective`` defective
  test images drawn per seed; evaluated on the rest of the test split over
  10 seeds (``supervised_splits``, ``run_protocol``);
- one-class (appendix A.2): bads are synthetic defects pasted on held-out good
  images (``synthesize_defects``, ``one_class_split``).

Plain numpy/pandas/scikit-image/XGBoost: no Prefect, no MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pandas as pd

from .errors import DefectflowError

if TYPE_CHECKING:  # xgboost is imported where a classifier is built, not at import time
    from xgboost import XGBClassifier

STATISTICS = ("q995", "skew", "kurt", "mean")
QUANTILE = 0.995
CLASSIFIER_KINDS = ("brf", "rf", "bt")
DEFECT_KINDS = ("blur", "rectangle", "line")
# Pixels per chunk of images x detectors in feature_matrix: bounds memory (float32 chunk
# plus float64 temporaries of one segment) to some hundred MB whatever n and S are.
_CHUNK_PIXELS = 1 << 23


# ------------------------------------------------------------------------------ segments


def grid_segments(size: int, k: int) -> np.ndarray:
    """A fixed grid of about ``k`` cells over an (size, size) map, ids row by row.

    ``rows = floor(sqrt(k))`` and ``cols = round(k / rows)`` (half up): exactly k
    cells for k = 1, 2, 4, 6, 9, 12, 16, 20, 25, 30, 36, 42, 49, 56, 64, ...; the
    nearest such grid otherwise (k=7 gives 2 x 4, k=32 gives 5 x 6). Neither
    side has more cells than pixels, so no cell is empty.
    """
    if int(size) < 1 or int(k) < 1:
        raise DefectflowError(f"grid segments need size >= 1 and k >= 1 (got size={size}, k={k})")
    size, k = int(size), int(k)
    rows = max(1, math.isqrt(k))
    cols = max(1, int(k / rows + 0.5))
    rows, cols = min(rows, size), min(cols, size)
    row_of = (np.arange(size) * rows) // size
    col_of = (np.arange(size) * cols) // size
    return (row_of[:, None] * cols + col_of[None, :]).astype(np.int32)


def superpixel_segments(reference_image_rgb: np.ndarray, k: int, size: int, seed: int = 0,
                        method: str = "slic", compactness: float = 10.0,
                        work_size: int = 256) -> np.ndarray:
    """Colour-position segments of one reference good image, as an (size, size) id map.

    The reference is resized (area) to ``max(size, work_size)`` square, i.e. the
    squashed view the detectors' (S, S) maps describe, and segmented there:

    - ``"slic"``: skimage SLIC superpixels in Lab (``n_segments=k``,
      ``compactness``), compact connected regions; deterministic (``seed``
      is not used);
    - ``"kmeans"``: KMeans (``random_state=seed``) on (L, a, b, x, y) with
      x, y scaled to 0..100 like L, so one segment may gather all pixels of
      a part's colour, SegAD's semantic segments in spirit.

    The labels are then resized to (size, size) by nearest neighbour and
    renumbered 0..K-1 (small regions can vanish in that resize, so K <= k).
    Apply the one map to every image of the category.
    """
    from skimage.color import rgb2lab

    image = _as_rgb_uint8(reference_image_rgb, "reference image")
    if int(k) < 1 or int(size) < 1:
        raise DefectflowError(f"superpixel segments need k >= 1 and size >= 1 (got {k}, {size})")
    side = max(int(size), int(work_size))
    work = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)
    if method == "slic":
        from skimage.segmentation import slic

        labels = slic(work, n_segments=int(k), compactness=float(compactness), start_label=0,
                      channel_axis=-1, convert2lab=True)
    elif method == "kmeans":
        from sklearn.cluster import KMeans

        lab = rgb2lab(work).reshape(-1, 3)
        yy, xx = np.mgrid[0:side, 0:side] * (100.0 / max(side - 1, 1))
        points = np.column_stack([lab, xx.ravel(), yy.ravel()])
        # Fit on a seeded sample of pixels (the clusters are colours and places, which a
        # few thousand pixels pin down), then assign every pixel.
        rng = np.random.default_rng(seed)
        sample = rng.choice(len(points), size=min(len(points), 8192), replace=False)
        model = KMeans(n_clusters=int(k), n_init=3, random_state=seed).fit(points[sample])
        labels = model.predict(points).reshape(side, side)
    else:
        raise DefectflowError(f"unknown superpixel method {method!r} (use 'slic' or 'kmeans')")
    resized = _resize_nearest(np.asarray(labels), int(size))
    return np.unique(resized, return_inverse=True)[1].reshape(resized.shape).astype(np.int32)


def mask_segments(masks: Sequence[str | Path | np.ndarray], size: int) -> np.ndarray:
    """User-supplied segment maps, one per image, as an (n, size, size) int32 array.

    Each item is an integer label image (PNG/TIFF, 8 or 16 bit, or ``.npy``)
    or an array whose pixel values are the segment ids (0 = first part; the
    same id means the same part in every image). They are resized to (size,
    size) by nearest neighbour. Ids are kept as they are, so K for the
    category is ``max id + 1`` over all images (``count_segments``); an id
    missing from an image is an empty segment there (its features are 0).
    """
    if len(masks) == 0:
        raise DefectflowError("no segment masks given")
    out = np.empty((len(masks), int(size), int(size)), dtype=np.int32)
    for i, item in enumerate(masks):
        source = item if isinstance(item, (str, Path)) else None
        labels = _read_label_image(item) if source is not None else np.asarray(item)
        where = source if source is not None else f"segment mask #{i}"
        if labels.ndim == 3:
            # A grey label PNG saved as RGB repeats the ids in every channel.
            if not (labels == labels[..., :1]).all():
                raise DefectflowError("segment mask has colour channels; expected one integer "
                                      "segment id per pixel", where)
            labels = labels[..., 0]
        if labels.ndim != 2 or labels.size == 0:
            raise DefectflowError(f"segment mask has shape {labels.shape}; expected (H, W)", where)
        if not np.issubdtype(labels.dtype, np.integer):
            if not (np.isfinite(labels).all() and (labels == np.round(labels)).all()):
                raise DefectflowError("segment mask holds non-integer values", where)
        if labels.min() < 0:
            raise DefectflowError("segment mask holds negative ids", where)
        out[i] = _resize_nearest(labels.astype(np.int64), int(size))
    return out


def count_segments(segments: np.ndarray) -> int:
    """K of a segment map or stack of maps: the largest id + 1."""
    return int(np.max(segments)) + 1


def _read_label_image(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise DefectflowError("segment mask file not found", path)
    if path.suffix.lower() == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as error:
            raise DefectflowError(f"cannot read segment mask ({error})", path) from None
    data = np.fromfile(str(path), dtype=np.uint8)
    # UNCHANGED keeps 16-bit ids; a colour file keeps its channels (checked by the caller).
    labels = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if labels is None:
        raise DefectflowError("cannot decode segment mask (corrupt or not an image file)", path)
    return labels


def _resize_nearest(labels: np.ndarray, height: int, width: int | None = None) -> np.ndarray:
    """Nearest-neighbour resize to (height, width or height), sampling at pixel centres.

    Indexing instead of cv2.resize keeps any integer dtype (16/32/64-bit ids).
    """
    width = height if width is None else width
    rows = np.minimum(((np.arange(height) + 0.5) * labels.shape[0] / height).astype(np.int64),
                      labels.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * labels.shape[1] / width).astype(np.int64),
                      labels.shape[1] - 1)
    return labels[rows[:, None], cols[None, :]]


def _as_rgb_uint8(image: np.ndarray, what: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise DefectflowError(f"{what} has shape {image.shape}; expected (H, W) or (H, W, 3)")
    if image.dtype != np.uint8:
        raise DefectflowError(f"{what} has dtype {image.dtype}; expected uint8")
    return image


# ------------------------------------------------------------------------------ features


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


# ---------------------------------------------------------------------------- classifier


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


# ------------------------------------------------------------------------------ protocol


@dataclass(frozen=True)
class FusionSplit:
    """Which images train the fusion and which evaluate it, for one seed."""

    train_ids: tuple[str, ...]
    eval_ids: tuple[str, ...]
    seed: int


def supervised_splits(image_ids: Sequence[str], labels: Sequence[int], splits: Sequence[str],
                      n_defective: int = 20, seeds: Iterable[int] = range(10)
                      ) -> list[FusionSplit]:
    """SegAD's supervised protocol, one split per seed.

    Train: every "val" image (good training images held out of the
    detectors' fit) plus ``n_defective`` defective "test" images drawn with
    the seed. At most half of the defective test images are drawn, so that
    some remain to evaluate on; the draw is the same as
    ``steps.labelled_defects`` (sorted ids, ``default_rng(seed).choice``).
    Eval: the rest of the test split. "train" images (the detectors fitted
    on them, their maps are optimistic) are never used.

    Pass only images that have anomaly maps from every detector.
    """
    ids = np.asarray(list(image_ids), dtype=object)
    labels = np.asarray(list(labels))
    splits = np.asarray(list(splits), dtype=object)
    if not len(ids) == len(labels) == len(splits):
        raise DefectflowError(f"{len(ids)} image ids, {len(labels)} labels and {len(splits)} "
                              "splits: expected one of each per image")
    if len(set(ids.tolist())) != len(ids):
        raise DefectflowError("image ids are not unique")
    val = splits == "val"
    test = splits == "test"
    if not val.any():
        raise DefectflowError("no held-out good ('val') images to train the fusion on "
                              "(set dataset.validation_fraction > 0)")
    if (labels[val] != 0).any():
        raise DefectflowError(f"'val' images must be good; defective: "
                              f"{sorted(ids[val & (labels != 0)].tolist())[:5]}")
    defective = np.sort(ids[test & (labels == 1)].astype(str))
    count = min(int(n_defective), len(defective) // 2)
    if count < 1:
        raise DefectflowError(f"the supervised fusion needs at least 2 defective test images "
                              f"(found {len(defective)}) and n_defective >= 1 "
                              f"(got {n_defective})")
    goods = tuple(sorted(ids[val].astype(str).tolist()))
    test_ids = sorted(ids[test].astype(str).tolist())
    result = []
    for seed in seeds:
        drawn = set(np.random.default_rng(seed).choice(defective, size=count, replace=False)
                    .tolist())
        result.append(FusionSplit(train_ids=goods + tuple(sorted(drawn)),
                                  eval_ids=tuple(i for i in test_ids if i not in drawn),
                                  seed=int(seed)))
    return result


def one_class_split(image_ids: Sequence[str], splits: Sequence[str],
                    synthetic_ids: Sequence[str], seed: int = 0) -> FusionSplit:
    """One-class mode (appendix A.2): train on the "val" goods (label 0) and synthetic
    defects made from held-out good images (label 1); evaluate on the whole test split.

    ``synthetic_ids`` name the rows of the synthetic images in the feature
    table (give them label 1 in the labels passed to ``fit_and_score``).
    """
    ids = list(image_ids)
    splits = list(splits)
    if len(ids) != len(splits):
        raise DefectflowError(f"{len(ids)} image ids for {len(splits)} splits")
    goods = sorted(i for i, s in zip(ids, splits) if s == "val")
    tests = sorted(i for i, s in zip(ids, splits) if s == "test")
    if not goods or not synthetic_ids:
        raise DefectflowError("one-class fusion needs 'val' good images and synthetic defects "
                              f"(got {len(goods)} and {len(synthetic_ids)})")
    split = FusionSplit(tuple(goods) + tuple(sorted(synthetic_ids)), tuple(tests), int(seed))
    assert_no_leakage([split])
    return split


def assert_no_leakage(splits: Iterable[FusionSplit]) -> None:
    """Raise if any split evaluates an image it trained on."""
    for split in splits:
        leaked = set(split.train_ids) & set(split.eval_ids)
        if leaked:
            raise DefectflowError(f"fusion split (seed {split.seed}) evaluates {len(leaked)} "
                                  f"images it trained on, e.g. {sorted(leaked)[:5]}")


def fit_and_score(features: pd.DataFrame, labels: Mapping[str, int] | pd.Series,
                  split: FusionSplit, kind: str = "brf", n_jobs: int = 2) -> pd.Series:
    """Fit the fusion on ``split.train_ids`` and score ``split.eval_ids`` (raw margins).

    ``features``: indexed by image id (``feature_frame``); ``labels``: image
    id -> 0/1. The classifier's seed is the split's seed.
    """
    labels = pd.Series(labels)
    _require_ids(features.index, split.train_ids + split.eval_ids, "feature table")
    _require_ids(labels.index, split.train_ids, "labels")
    train = list(split.train_ids)
    model = fit_classifier(features.loc[train].to_numpy(np.float32),
                           labels.loc[train].to_numpy(), kind=kind, seed=split.seed,
                           n_jobs=n_jobs)
    scores = margin_scores(model, features.loc[list(split.eval_ids)].to_numpy(np.float32))
    return pd.Series(scores, index=pd.Index(split.eval_ids, name="image_id"), name="score")


@dataclass
class ProtocolResult:
    """Per-seed metrics, every seed's evaluation scores, and their summary over seeds."""

    per_seed: pd.DataFrame   # seed, image_auroc, image_aupr, n_train_good, n_train_bad, n_eval
    scores: pd.DataFrame     # seed, image_id, label, score

    @property
    def summary(self) -> dict[str, float]:
        """Mean and standard deviation (ddof=1; NaN for one seed) of each metric column."""
        metrics = [c for c in self.per_seed.columns
                   if c not in ("seed", "n_train_good", "n_train_bad", "n_eval")]
        out = {}
        for column in metrics:
            values = self.per_seed[column].astype(float)
            out[f"{column}_mean"] = float(values.mean())
            out[f"{column}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        return out


def run_protocol(features: pd.DataFrame, labels: Mapping[str, int] | pd.Series,
                 splits: Sequence[FusionSplit], kind: str = "brf",
                 baselines: Sequence[str] = (), n_jobs: int = 2) -> ProtocolResult:
    """Fit and evaluate the fusion once per split (seed).

    ``baselines``: feature columns (e.g. ``"patchcore.image_score"``) whose raw
    values are evaluated on the same images, as ``"<column>_auroc"`` and
    ``"<column>_aupr"`` columns: the comparison SegAD reports.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    splits = list(splits)
    if not splits:
        raise DefectflowError("no fusion splits to run")
    assert_no_leakage(splits)
    missing = [c for c in baselines if c not in features.columns]
    if missing:
        raise DefectflowError(f"baseline columns {missing} are not in the feature table")
    labels = pd.Series(labels)

    def metrics(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
        if y.min() == y.max():  # one class only: the ranking metrics are undefined
            return float("nan"), float("nan")
        return float(roc_auc_score(y, s)), float(average_precision_score(y, s))

    rows, score_tables = [], []
    for split in splits:
        scores = fit_and_score(features, labels, split, kind=kind, n_jobs=n_jobs)
        _require_ids(labels.index, split.eval_ids, "labels")
        y_eval = labels.loc[list(split.eval_ids)].to_numpy().astype(int)
        y_train = labels.loc[list(split.train_ids)].to_numpy().astype(int)
        auroc, aupr = metrics(y_eval, scores.to_numpy())
        row = dict(seed=split.seed, image_auroc=auroc, image_aupr=aupr,
                   n_train_good=int((y_train == 0).sum()), n_train_bad=int((y_train == 1).sum()),
                   n_eval=len(split.eval_ids))
        for column in baselines:
            base = features.loc[list(split.eval_ids), column].to_numpy(np.float64)
            row[f"{column}_auroc"], row[f"{column}_aupr"] = metrics(y_eval, base)
        rows.append(row)
        score_tables.append(pd.DataFrame({"seed": split.seed, "image_id": list(split.eval_ids),
                                          "label": y_eval, "score": scores.to_numpy()}))
    return ProtocolResult(pd.DataFrame(rows), pd.concat(score_tables, ignore_index=True))


def _require_ids(index: pd.Index, ids: Sequence[str], what: str) -> None:
    missing = pd.Index(list(ids)).difference(index)
    if len(missing):
        raise DefectflowError(f"{what} lacks {len(missing)} image ids of the fusion split, "
                              f"e.g. {sorted(missing.tolist())[:5]}")


# -------------------------------------------------------------------- one-class defects


def synthesize_defects(image_rgb: np.ndarray, segments: np.ndarray, rng: np.random.Generator,
                       kind: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic defect on a held-out good image (SegAD appendix A.2); returns (image, mask).

    ``kind`` (random when None) is one of:

    - ``"blur"``: Gaussian blur of a random box around a point of one
      segment, applied only where the box lies in that segment;
    - ``"rectangle"``: a small filled rectangle (3-10 % of the side) of a
      random colour, or grey level on grey images, far from the local mean;
    - ``"line"``: a thin rectangle, 1-3 px wide and 10-30 % of the side
      long, at a random angle, of such a colour.

    ``segments`` is the category's (S, S) id map, resized to the image by
    nearest neighbour. ``mask`` (bool, H x W) is the defect's footprint: every
    pixel that changed lies in it, and it is never empty. A blur that barely
    changes anything (a flat region) is tried elsewhere, then replaced by a
    rectangle, so the defect is always visible.
    """
    image = np.asarray(image_rgb)
    grey_input = image.ndim == 2
    rgb = _as_rgb_uint8(image, "image")
    height, width = rgb.shape[:2]
    segments = np.asarray(segments)
    if segments.ndim != 2:
        raise DefectflowError(f"segments have shape {segments.shape}; expected (S, S)")
    if segments.shape != (height, width):
        segments = _resize_nearest(segments, height, width)
    kind = DEFECT_KINDS[int(rng.integers(len(DEFECT_KINDS)))] if kind is None else kind
    if kind not in DEFECT_KINDS:
        raise DefectflowError(f"unknown synthetic defect {kind!r} (use one of {DEFECT_KINDS})")
    grey = bool((rgb == rgb[..., :1]).all())
    side = min(height, width)

    out, mask = None, None
    if kind == "blur":
        for _ in range(10):
            out, mask = _blur_defect(rgb, segments, rng, side)
            if mask.any() and np.abs(out.astype(int) - rgb)[mask].mean() >= 2.0:
                break
        else:
            kind = "rectangle"
    if kind in ("rectangle", "line"):
        y, x = _point_in_segment(segments, rng)
        if kind == "rectangle":
            half_h = max(1, int(rng.uniform(0.015, 0.05) * side))
            half_w = max(1, int(rng.uniform(0.015, 0.05) * side))
            mask = np.zeros((height, width), bool)
            mask[max(0, y - half_h):y + half_h + 1, max(0, x - half_w):x + half_w + 1] = True
        else:
            mask = _thin_rectangle((height, width), (y, x),
                                   length=max(3.0, rng.uniform(0.1, 0.3) * side),
                                   thickness=int(rng.integers(1, 4)),
                                   angle=rng.uniform(0, np.pi))
        out = rgb.copy()
        out[mask] = _contrasting_colour(rgb[mask], grey, rng)
    return (out[..., 0].copy() if grey_input else out), mask


def _point_in_segment(segments: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    """A random pixel of a random segment (segments of fewer than 9 pixels only if all are)."""
    ids, counts = np.unique(segments, return_counts=True)
    candidates = ids[counts >= 9] if (counts >= 9).any() else ids
    ys, xs = np.nonzero(segments == candidates[int(rng.integers(len(candidates)))])
    pick = int(rng.integers(len(ys)))
    return int(ys[pick]), int(xs[pick])


def _blur_defect(rgb: np.ndarray, segments: np.ndarray, rng: np.random.Generator,
                 side: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = _point_in_segment(segments, rng)
    half = max(2, int(rng.uniform(0.05, 0.15) * side))
    box = np.zeros(segments.shape, bool)
    box[max(0, y - half):y + half + 1, max(0, x - half):x + half + 1] = True
    mask = box & (segments == segments[y, x])
    blurred = cv2.GaussianBlur(rgb, (0, 0), sigmaX=float(rng.uniform(2.0, 5.0)))
    out = rgb.copy()
    out[mask] = blurred[mask]
    return out, mask


def _thin_rectangle(shape: tuple[int, int], centre: tuple[int, int], length: float,
                    thickness: int, angle: float) -> np.ndarray:
    """Pixels whose centres lie in a rotated length x thickness rectangle (exact width;
    cv2.line's thick lines add round caps and grow wider on diagonals)."""
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]]
    dy, dx = ys - centre[0], xs - centre[1]
    along = dx * np.cos(angle) + dy * np.sin(angle)
    across = -dx * np.sin(angle) + dy * np.cos(angle)
    return (np.abs(along) <= length / 2) & (np.abs(across) <= thickness / 2)


def _contrasting_colour(pixels: np.ndarray, grey: bool, rng: np.random.Generator) -> np.ndarray:
    """A random colour (grey level on grey images) at least 80 levels from the pixels' mean."""
    mean = pixels.reshape(-1, 3).mean(axis=0)
    for _ in range(20):
        colour = np.full(3, rng.integers(0, 256)) if grey else rng.integers(0, 256, size=3)
        if np.abs(colour - mean).max() >= 80:
            return colour.astype(np.uint8)
    # Mean near mid-grey on every channel: the far end of the range always contrasts.
    return np.where(mean < 128, 255, 0).astype(np.uint8)
