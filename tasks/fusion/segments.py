"""Segment maps for the SegAD fusion: a fixed grid, superpixels of a reference good image,
or user-supplied part masks, as (S, S) or (n, S, S) integer id maps over the anomaly maps."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from ..errors import DefectflowError


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

    image = as_rgb_uint8(reference_image_rgb, "reference image")
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
    resized = resize_nearest(np.asarray(labels), int(size))
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
        out[i] = resize_nearest(labels.astype(np.int64), int(size))
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


def resize_nearest(labels: np.ndarray, height: int, width: int | None = None) -> np.ndarray:
    """Nearest-neighbour resize to (height, width or height), sampling at pixel centres.

    Indexing instead of cv2.resize keeps any integer dtype (16/32/64-bit ids).
    """
    width = height if width is None else width
    rows = np.minimum(((np.arange(height) + 0.5) * labels.shape[0] / height).astype(np.int64),
                      labels.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * labels.shape[1] / width).astype(np.int64),
                      labels.shape[1] - 1)
    return labels[rows[:, None], cols[None, :]]


def as_rgb_uint8(image: np.ndarray, what: str) -> np.ndarray:
    """``image`` as (H, W, 3) uint8 (a grey image repeated on three channels); ``what`` names
    it in the error when it is neither."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise DefectflowError(f"{what} has shape {image.shape}; expected (H, W) or (H, W, 3)")
    if image.dtype != np.uint8:
        raise DefectflowError(f"{what} has dtype {image.dtype}; expected uint8")
    return image
