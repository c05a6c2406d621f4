"""Overlay figures of anomaly maps on their images, and which test images to draw.

``save_overlay`` draws one image (or patch), ``full_image_figure`` one large image with
its stitched map (thesis Fig. 6.3); ``save_overlays`` and ``save_full_image_figures`` draw
an evaluation's chosen test images from a score folder's maps.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..errors import DefectflowError
from ..images import read_image, read_mask
from .localization import stitched_map
from .metrics import labels_and_scores
from .plots import save_figure

DISPLAY_MAX_SIDE = 1024  # larger images are downscaled for the full-image figure
_EXCLUDED_GREY = 0.6


def pick_overlay_examples(labels: np.ndarray, scores: np.ndarray, n: int = 6) -> list[int]:
    """Indices of up to ``n`` informative test images, in a fixed order.

    Taken in turns from four rankings: highest-scoring defective (clear hits),
    lowest-scoring defective (likely misses), highest-scoring good (likely false
    alarms), lowest-scoring good (clean references); each turn takes the next
    image of its ranking not picked yet. Ties go to the lower index, so the
    choice is deterministic.
    """
    labels, scores = labels_and_scores(labels, scores)

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

    figure, panels = _four_panels(4.4, image, mask, mask_or_none is not None, anomaly_map,
                                  "jet", low, high, "anomaly map")
    panels[3].imshow(overlay)
    if mask.any():
        panels[3].contour(mask, levels=[0.5], colors="white", linewidths=1)
    panels[3].set_title("overlay")
    for panel in panels:
        panel.set_axis_off()
    figure.suptitle(title)
    figure.tight_layout()
    return save_figure(figure, path)


def overlay_picks(folder: Path, test: pd.DataFrame, count: int) -> list[int]:
    """Create the overlay folder; the test images (positions in ``test``) to draw."""
    folder.mkdir()
    if count <= 0:
        return []
    return pick_overlay_examples(test["label"].to_numpy(), test["score"].to_numpy(), n=count)


def save_overlays(folder: Path, test: pd.DataFrame, test_patches: pd.DataFrame,
                  maps: np.ndarray, manifest: pd.DataFrame, count: int) -> None:
    """Overlays of ``count`` chosen test images, each shown by its worst patch."""
    picks = overlay_picks(folder, test, count)
    if not picks:
        return
    man = manifest.set_index("image_id")
    # One colour scale for every overlay, so that maps compare by eye.
    peaks = np.asarray(maps[test_patches.index.to_numpy()], dtype=np.float32).max(axis=(1, 2))
    vmax = float(np.quantile(peaks, 0.99))
    for pick in picks:
        image_id = test["image_id"].iloc[pick]
        # The image's worst patch stands for it (the whole image when patches are images).
        patches = test_patches[test_patches["image_id"] == image_id]
        best = patches["score"].idxmax()
        row = test_patches.loc[best]
        info = man.loc[image_id]
        image = read_image(info["path"])[row.y:row.y + row.height, row.x:row.x + row.width]
        mask = None
        if isinstance(info["mask_path"], str):
            mask = read_mask(info["mask_path"], (info["height"], info["width"]))[
                row.y:row.y + row.height, row.x:row.x + row.width]
        name = image_id.replace("/", "_")
        save_overlay(image, mask, np.asarray(maps[best], dtype=np.float32),
                     folder / f"{name}.png",
                     title=f"{image_id}  score {row.score:.3f}", vmin=0, vmax=vmax)


def save_full_image_figures(folder: Path, test: pd.DataFrame, test_patches: pd.DataFrame,
                            maps: np.ndarray, manifest: pd.DataFrame, count: int) -> None:
    """Thesis Fig. 6.3 style figures (image, ground truth, stitched map, overlay)."""
    picks = overlay_picks(folder, test, count)
    man = manifest.set_index("image_id")
    vmax = float(np.quantile(test_patches["score"], 0.99))
    for pick in picks:
        image_id = test["image_id"].iloc[pick]
        info = man.loc[image_id]
        image_rows = test_patches[test_patches["image_id"] == image_id]
        stitched, excluded = stitched_map(image_rows, maps, info)
        mask = (read_mask(info["mask_path"], (int(info["height"]), int(info["width"])))
                if isinstance(info["mask_path"], str) else None)
        full_image_figure(read_image(info["path"]), mask, stitched, excluded,
                          folder / f"{image_id.replace('/', '_')}.png",
                          title=f"{image_id}  score {test['score'].iloc[pick]:.3f}",
                          vmin=0.0, vmax=vmax)


def _four_panels(height: float, image: np.ndarray, mask: np.ndarray, has_truth: bool,
                 shown_map, cmap, low: float, high: float, map_title: str):
    """A 16-inch wide figure of four panels, the first three drawn: image, ground truth,
    anomaly map with its colour bar. Returns (figure, panels); the fourth is the caller's."""
    figure = Figure(figsize=(16, height), dpi=100)
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, 4)
    panels[0].imshow(image)
    panels[0].set_title("image")
    panels[1].imshow(mask, cmap="gray", vmin=0, vmax=1)
    panels[1].set_title("ground truth" if has_truth else "ground truth (none)")
    drawn = panels[2].imshow(shown_map, cmap=cmap, vmin=low, vmax=high)
    panels[2].set_title(map_title)
    figure.colorbar(drawn, ax=panels[2], fraction=0.046, pad=0.04)
    return figure, panels


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

    figure, panels = _four_panels(4.6, shown_image, shown_mask, mask is not None,
                                  np.ma.masked_invalid(shown_map), colormap, low, high,
                                  "anomaly map (grey: not inspected)")
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
    return save_figure(figure, path)
