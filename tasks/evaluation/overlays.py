"""Overlay figures of anomaly maps on their images, drawn at the detector's threshold.

``save_overlay`` draws one image (or patch), ``full_image_figure`` one large image with
its stitched map (thesis Fig. 6.3). Both show what the model decided:

- the title names the method, the image, its true label, the verdict at the threshold and
  whether that is a hit, a miss, a false alarm or a correct pass (``overlay_title``);
- the colour scale starts at the good images' normal level, so a good image stays blue,
  and the colour bar marks the map threshold;
- a white contour surrounds the region of the map at or above the map threshold;
- the ground-truth panel appears only when the image has a mask (its outline is green).

Which images are drawn, and the per-category grid of every method, is ``examples``'s job.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..errors import DefectflowError
from .plots import save_figure

DISPLAY_MAX_SIDE = 1024  # larger images are downscaled for the full-image figure
_EXCLUDED_GREY = 0.6
CONTOUR_RGB = (1.0, 1.0, 1.0)  # the threshold region's outline in the overlay panel
_TRUTH_COLOUR = "lime"          # the ground-truth outline


def outcome(label: int, flagged: bool) -> str:
    """What a verdict means for an image of a known label."""
    if label:
        return "hit" if flagged else "miss"
    return "false alarm" if flagged else "correct pass"


def overlay_title(method: str, name: str, label: int | None, score: float,
                  threshold: float | None) -> str:
    """"<method> | <name> | true: <label> | verdict: <verdict> (<outcome>) | score s vs
    threshold t": everything an inspector needs to read the figure. ``label`` None: unknown
    (a new image); ``threshold`` None or NaN: no verdict."""
    parts = [method, name]
    if label is not None:
        parts.append(f"true: {'defective' if label else 'good'}")
    if threshold is None or math.isnan(threshold):
        parts.append(f"score {score:.4g} (no threshold)")
        return "  |  ".join(parts)
    flagged = score >= threshold
    verdict = f"verdict: {'defective' if flagged else 'good'}"
    if label is not None:
        verdict += f" ({outcome(label, flagged)})"
    parts += [verdict, f"score {score:.4g} vs threshold {threshold:.4g}"]
    return "  |  ".join(parts)


def threshold_contours(anomaly_map: np.ndarray, threshold: float) -> list[np.ndarray]:
    """The outer outlines (OpenCV contours) of the map's pixels at or above ``threshold``."""
    above = (np.nan_to_num(np.asarray(anomaly_map, dtype=np.float32), nan=-np.inf)
             >= threshold).astype(np.uint8)
    contours, _ = cv2.findContours(above, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return list(contours)


def overlay_pixels(image: np.ndarray, anomaly_map: np.ndarray, low: float, high: float,
                   threshold: float | None = None) -> np.ndarray:
    """The overlay panel as float RGB in [0, 1]: the map (already at the image's size) as a
    jet heatmap from ``low`` to ``high`` blended over the image, and the outline of the
    region at or above ``threshold`` drawn in ``CONTOUR_RGB`` (one pixel wide per 400 px)."""
    heat = colormaps["jet"](np.clip((np.nan_to_num(anomaly_map, nan=low) - low)
                                    / (high - low), 0, 1))[..., :3]
    overlay = np.ascontiguousarray(0.5 * image / 255.0 + 0.5 * heat)
    if threshold is not None and not math.isnan(threshold):
        thickness = max(1, round(max(image.shape[:2]) / 400))
        cv2.drawContours(overlay, threshold_contours(anomaly_map, threshold), -1, CONTOUR_RGB,
                         thickness)
    return overlay


def _scale(anomaly_map: np.ndarray, vmin: float | None, vmax: float | None,
           threshold: float | None) -> tuple[float, float]:
    """(low, high) of the colour scale: the given ones (default: the map's finite range),
    widened so the threshold lies inside."""
    finite = anomaly_map[np.isfinite(anomaly_map)]
    low = float(vmin) if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    high = float(vmax) if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    if threshold is not None and not math.isnan(threshold) and threshold > low:
        high = max(high, threshold * 1.05 if threshold > 0 else threshold + 1e-6)
    if high <= low:  # flat map: any non-empty range shows it as one colour
        high = low + 1e-12
    return low, high


def overlay_figure(image: np.ndarray, mask: np.ndarray | None, anomaly_map: np.ndarray,
                   title: str, low: float, high: float, threshold: float | None = None,
                   excluded: np.ndarray | None = None, height: float = 4.4) -> Figure:
    """The figure: image, ground truth (only with a mask), anomaly map with its colour bar
    (the threshold marked) and the overlay with the threshold contour. ``anomaly_map`` is
    at the image's size (NaN: not inspected, shown grey); ``excluded`` regions are hatched."""
    panels_wanted = 4 if mask is not None else 3
    figure = Figure(figsize=(4 * panels_wanted, height), dpi=100)
    FigureCanvasAgg(figure)
    panels = list(figure.subplots(1, panels_wanted))
    panels[0].imshow(image)
    panels[0].set_title("image")
    if mask is not None:
        panels[1].imshow(mask, cmap="gray", vmin=0, vmax=1)
        panels[1].set_title("ground truth")
    map_panel, overlay_panel = panels[-2], panels[-1]
    colormap = colormaps["jet"].with_extremes(bad=str(_EXCLUDED_GREY))
    drawn = map_panel.imshow(np.ma.masked_invalid(anomaly_map), cmap=colormap, vmin=low,
                             vmax=high)
    map_panel.set_title("anomaly map (grey: not inspected)" if np.isnan(anomaly_map).any()
                        else "anomaly map")
    bar = figure.colorbar(drawn, ax=map_panel, fraction=0.046, pad=0.04)
    overlay = overlay_pixels(image, anomaly_map, low, high, threshold)
    if np.isnan(anomaly_map).any():
        overlay[np.isnan(anomaly_map)] = 0.5 * image[np.isnan(anomaly_map)] / 255.0 + 0.3
    overlay_panel.imshow(np.clip(overlay, 0, 1))
    if threshold is not None and not math.isnan(threshold):
        bar.ax.axhline(threshold, color="white", lw=3)
        bar.ax.axhline(threshold, color="black", lw=1)
        bar.set_label(f"threshold {threshold:.4g} (line); from the good images' level")
        overlay_panel.set_title("overlay (white: above the threshold)")
    else:
        overlay_panel.set_title("overlay")
    if excluded is not None and excluded.any():
        for panel in (map_panel, overlay_panel):  # hatch the excluded regions over the grey
            panel.contourf(excluded.astype(np.float32), levels=[0.5, 1.5], colors="none",
                           hatches=["///"])
    if mask is not None and mask.any():
        overlay_panel.contour(mask, levels=[0.5], colors=_TRUTH_COLOUR, linewidths=1)
    for panel in panels:
        panel.set_axis_off()
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def _check_image(image: np.ndarray, path) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DefectflowError(
            f"overlay needs an RGB uint8 image, got {image.dtype} {image.shape}", path
        )
    return image


def save_overlay(
    image_rgb_uint8: np.ndarray,
    mask_or_none: np.ndarray | None,
    anomaly_map: np.ndarray,
    path: str | Path,
    title: str,
    vmin: float | None = None,
    vmax: float | None = None,
    threshold: float | None = None,
) -> Path:
    """Write one PNG: image, ground truth (only with a mask), anomaly map, overlay.

    ``anomaly_map`` may be smaller than the image; it is resized bilinearly to it.
    ``vmin``/``vmax`` fix the colour scale (pass the same ones for all images of a
    run so their colours compare: ``vmin`` the good images' normal level); by default
    the map's own range. ``threshold`` (in map units) is marked on the colour bar and
    outlined in the overlay.
    """
    image = _check_image(image_rgb_uint8, path)
    height, width = image.shape[:2]
    if np.ndim(anomaly_map) != 2:
        raise DefectflowError(
            f"anomaly map has shape {np.shape(anomaly_map)}, expected H x W", path
        )
    mask = None if mask_or_none is None else np.asarray(mask_or_none, dtype=bool)
    if mask is not None and mask.shape != (height, width):
        raise DefectflowError(
            f"mask shape {mask.shape} differs from the image's {(height, width)}", path
        )
    anomaly_map = cv2.resize(
        np.asarray(anomaly_map, dtype=np.float32), (width, height), interpolation=cv2.INTER_LINEAR
    )
    low, high = _scale(anomaly_map, vmin, vmax, threshold)
    return save_figure(overlay_figure(image, mask, anomaly_map, title, low, high, threshold),
                       path)


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
                      max_side: int = DISPLAY_MAX_SIDE, threshold: float | None = None) -> Path:
    """Write a PNG as the thesis' Fig. 6.3: image, ground truth (with a mask), anomaly map
    (excluded regions grey and hatched, uncovered ones grey), overlay with the threshold
    contour.

    Images larger than ``max_side`` are downscaled for display (the mask so
    that a defect of one pixel stays visible). ``vmin``/``vmax`` fix the
    colour scale (default: the map's range over covered pixels).
    """
    image = _check_image(image, path)
    height, width = image.shape[:2]
    stitched_map = np.asarray(stitched_map, dtype=np.float32)
    for name, array in (("anomaly map", stitched_map), ("mask", mask), ("excluded", excluded)):
        if array is not None and np.shape(array) != (height, width):
            raise DefectflowError(
                f"{name} has shape {np.shape(array)}, the image is {(height, width)}", path
            )

    size = _display_scale(height, width, max_side)
    shown_image = image if size is None else cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    shown_mask = (None if mask is None
                  else _shrink_bool(np.asarray(mask, dtype=bool), size, any_pixel=True))
    shown_map = _shrink_map(stitched_map, size)
    shown_excluded = (None if excluded is None
                      else _shrink_bool(np.asarray(excluded, dtype=bool), size, any_pixel=False))
    low, high = _scale(shown_map, vmin, vmax, threshold)
    return save_figure(overlay_figure(shown_image, shown_mask, shown_map, title, low, high,
                                      threshold, excluded=shown_excluded, height=4.6), path)
