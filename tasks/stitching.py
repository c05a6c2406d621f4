"""Patch anomaly maps back into one map of the whole (large) image.

Each patch's map is resized bilinearly to its window and the windows are
averaged where they overlap. Pixels that no window covers (dropped dark
windows, the background outside the borders, label boxes) and excluded pixels
are NaN, so every metric can leave them out (see :func:`covered_pixels`).
Accumulators are float32 at image size and one patch is resized at a time:
a 5000 x 5000 image costs about 150 MB, whatever the number of patches.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from .errors import DefectflowError

Window = tuple[int, int, int, int]



def stitch(patch_maps: np.ndarray, windows: Sequence[Window], width: int, height: int,
           excluded: np.ndarray | None = None) -> np.ndarray:
    """The anomaly map of a whole image, float32 (height, width), NaN where nothing applies.

    Args:
        patch_maps: (n, S, S) (or (n, Sh, Sw)) maps, one per window; any float
            dtype, may be memory-mapped (read one at a time).
        windows: the n windows ``(x, y, w, h)`` in image pixels.
        width, height: the image's size.
        excluded: optional bool (height, width); True pixels become NaN
            (e.g. :func:`annotations.excluded_mask`).
    """
    if np.ndim(patch_maps) != 3:
        raise DefectflowError(f"patch maps must be (n, S, S), got shape {np.shape(patch_maps)}")
    if len(patch_maps) != len(windows):
        raise DefectflowError(f"{len(patch_maps)} patch maps but {len(windows)} windows")
    if excluded is not None and np.shape(excluded) != (height, width):
        raise DefectflowError(
            f"excluded mask has shape {np.shape(excluded)}, expected {(height, width)}"
        )
    total = np.zeros((height, width), dtype=np.float32)
    # Windows per pixel; uint16 is enough unless a pixel could be covered 65,536 times.
    count = np.zeros((height, width), dtype=np.uint16 if len(windows) < 65535 else np.uint32)
    for index, window in enumerate(windows):
        x, y, w, h = (int(v) for v in window)
        if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > width or y + h > height:
            raise DefectflowError(
                f"window {index} {(x, y, w, h)} lies outside the {width}x{height} image"
            )
        patch = np.asarray(patch_maps[index], dtype=np.float32)
        if patch.shape != (h, w):
            patch = cv2.resize(patch, (w, h), interpolation=cv2.INTER_LINEAR)
        total[y:y + h, x:x + w] += patch
        count[y:y + h, x:x + w] += 1
    covered = count > 0
    np.divide(total, count, out=total, where=covered)
    total[~covered] = np.nan
    if excluded is not None:
        total[np.asarray(excluded, dtype=bool)] = np.nan
    return total


def image_score_from_patches(scores: Sequence[float] | np.ndarray) -> float:
    """An image's score: the maximum of its patches' scores."""
    values = np.asarray(scores, dtype=np.float64).ravel()
    if values.size == 0:
        raise DefectflowError("an image without patch scores has no score")
    return float(values.max())


def covered_pixels(stitched_map: np.ndarray,
                   mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(ground truth, score) of the pixels the stitched map covers (not NaN), as 1-D arrays.

    A missing mask means an all-good image. Use these for pixel metrics, so
    background, label boxes and uncovered strips count neither way.
    """
    stitched_map = np.asarray(stitched_map)
    valid = ~np.isnan(stitched_map)
    truth = (np.zeros(int(valid.sum()), dtype=bool) if mask is None
             else np.asarray(mask, dtype=bool)[valid])
    return truth, stitched_map[valid].astype(np.float32, copy=False)
