"""Patch anomaly maps back into one map of the whole (large) image, and its figure.

Each patch's map is resized bilinearly to its window and the windows are
averaged where they overlap. Pixels that no window covers (dropped dark
windows, the background outside the borders, label boxes) and excluded pixels
are NaN, so every metric can leave them out (see :func:`covered_pixels`).
Accumulators are float32 at image size and one patch is resized at a time:
a 5000 x 5000 image costs about 150 MB, whatever the number of patches.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from .errors import DefectflowError

Window = tuple[int, int, int, int]

DISPLAY_MAX_SIDE = 1024  # larger images are downscaled for the figure
_EXCLUDED_GREY = 0.6


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


# --------------------------------------------------------------------------- figure


def _display_scale(height: int, width: int, max_side: int) -> tuple[int, int] | None:
    """(width, height) to show the image at, or None when it is small enough already."""
    if max(height, width) <= max_side:
        return None
    scale = max_side / max(height, width)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _shrink_bool(mask: np.ndarray, size: tuple[int, int] | None, any_pixel: bool) -> np.ndarray:
    """Downscaled bool mask: a cell is True when any (or most) of its pixels are."""
    if size is None:
        return mask
    area = cv2.resize(mask.astype(np.uint8) * 255, size, interpolation=cv2.INTER_AREA)
    return area > 0 if any_pixel else area >= 128


def _shrink_map(stitched_map: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Downscaled map that averages the covered pixels only (NaN where most are uncovered)."""
    if size is None:
        return stitched_map
    valid = ~np.isnan(stitched_map)
    values = cv2.resize(np.where(valid, stitched_map, 0).astype(np.float32), size,
                        interpolation=cv2.INTER_AREA)
    weight = cv2.resize(valid.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    shown = np.full(values.shape, np.nan, dtype=np.float32)
    np.divide(values, weight, out=shown, where=weight >= 0.5)
    return shown


def full_image_figure(image: np.ndarray, mask: np.ndarray | None, stitched_map: np.ndarray,
                      excluded: np.ndarray | None, path: str | Path, title: str,
                      vmin: float | None = None, vmax: float | None = None,
                      max_side: int = DISPLAY_MAX_SIDE) -> Path:
    """Write a PNG with four panels, as the thesis' Fig. 6.3: image, ground truth,
    anomaly map (excluded regions grey and hatched, uncovered ones grey), overlay.

    Images larger than ``max_side`` are downscaled for display (the mask so
    that a defect of one pixel stays visible). ``vmin``/``vmax`` fix the
    colour scale (default: the map's range over covered pixels).
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DefectflowError(
            f"figure needs an RGB uint8 image, got {image.dtype} {image.shape}", path
        )
    height, width = image.shape[:2]
    stitched_map = np.asarray(stitched_map, dtype=np.float32)
    for name, array in (("anomaly map", stitched_map), ("mask", mask), ("excluded", excluded)):
        if array is not None and np.shape(array) != (height, width):
            raise DefectflowError(
                f"{name} has shape {np.shape(array)}, the image is {(height, width)}", path
            )

    size = _display_scale(height, width, max_side)
    shown_image = image if size is None else cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    shown_mask = (np.zeros(shown_image.shape[:2], dtype=bool) if mask is None
                  else _shrink_bool(np.asarray(mask, dtype=bool), size, any_pixel=True))
    shown_map = _shrink_map(stitched_map, size)
    shown_excluded = (None if excluded is None
                      else _shrink_bool(np.asarray(excluded, dtype=bool), size, any_pixel=False))

    finite = shown_map[np.isfinite(shown_map)]
    low = float(vmin) if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    high = float(vmax) if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    if high <= low:  # flat map: any non-empty range shows it as one colour
        high = low + 1e-12

    colormap = colormaps["jet"].with_extremes(bad=str(_EXCLUDED_GREY))
    valid = np.isfinite(shown_map)
    heat = colormap(np.clip((np.nan_to_num(shown_map, nan=low) - low) / (high - low), 0, 1))
    base = shown_image / 255.0
    overlay = np.where(valid[..., None], 0.5 * base + 0.5 * heat[..., :3],
                       0.5 * base + 0.5 * _EXCLUDED_GREY)

    figure = Figure(figsize=(16, 4.6), dpi=100)
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, 4)
    panels[0].imshow(shown_image)
    panels[0].set_title("image")
    panels[1].imshow(shown_mask, cmap="gray", vmin=0, vmax=1)
    panels[1].set_title("ground truth" if mask is not None else "ground truth (none)")
    drawn = panels[2].imshow(np.ma.masked_invalid(shown_map), cmap=colormap, vmin=low, vmax=high)
    figure.colorbar(drawn, ax=panels[2], fraction=0.046, pad=0.04)
    panels[2].set_title("anomaly map (grey: not inspected)")
    panels[3].imshow(overlay)
    panels[3].set_title("overlay")
    if shown_excluded is not None and shown_excluded.any():
        for panel in panels[2:]:  # hatch the excluded regions over the grey
            panel.contourf(shown_excluded.astype(np.float32), levels=[0.5, 1.5], colors="none",
                           hatches=["///"])
    if shown_mask.any():
        panels[3].contour(shown_mask, levels=[0.5], colors="white", linewidths=1)
    for panel in panels:
        panel.set_axis_off()
    figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
