"""Overlay figures of anomaly maps on their images, and which test images to draw.

``save_overlay`` draws one image; ``save_overlays`` and ``save_full_image_figures`` draw
an evaluation's chosen test images from a score folder's maps (whole images or patches,
and stitched windows of large images).
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
from ..stitching import full_image_figure
from .localization import stitched_map
from .metrics import labels_and_scores
from .plots import save_figure


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
