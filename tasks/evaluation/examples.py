"""Which test images an evaluation draws, at which colour scale and map threshold, and the
per-category grid of the same images under every method.

- ``display_levels``: from the held-out good images (the ones that set the image threshold,
  never test labels): the colour scale's start (their maps' median, the normal level), the
  map threshold (the same quantile of their map peaks as the image threshold of their
  scores) and the scale's top;
- ``save_overlays`` / ``save_full_image_figures``: a detector's overlays, named after the
  image's defect folder and original file stem (``good_cell0004.png``);
- ``save_method_grid``: one figure, rows = the same chosen test images, columns = methods.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..images import read_image, read_mask
from .localization import stitched_map
from .metrics import labels_and_scores, threshold_from_good
from .overlays import (_scale, full_image_figure, outcome, overlay_pixels, overlay_title,
                       save_overlay)
from .plots import save_figure

_PIECE = 256  # maps read at once when taking peaks (bounded memory on a memory-mapped array)
_NORMAL_SAMPLE = 64  # good maps whose pixels give the normal level


@dataclass(frozen=True)
class DisplayLevels:
    """How a detector's maps are shown: colour scale from ``low`` (the good images' normal
    level) to ``high``; ``map_threshold`` outlined and marked on the colour bar."""

    low: float
    high: float
    map_threshold: float

    def write(self, folder: Path) -> None:
        (folder / "display.json").write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def read(cls, folder: str | Path) -> "DisplayLevels | None":
        path = Path(folder) / "display.json"
        return cls(**json.loads(path.read_text())) if path.is_file() else None


def _peaks(maps: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(maps[rows[i:i + _PIECE]], dtype=np.float32)
                           .max(axis=(1, 2)) for i in range(0, len(rows), _PIECE)]
                          or [np.zeros(0, np.float32)])


def display_levels(val_rows: np.ndarray, test_rows: np.ndarray, maps: np.ndarray,
                   quantile: float) -> DisplayLevels:
    """``val_rows``/``test_rows``: rows of ``maps`` of the held-out good and the test patches."""
    test_peaks = _peaks(maps, test_rows)
    high = float(np.quantile(test_peaks, 0.99)) if test_peaks.size else 1.0
    if len(val_rows) == 0:  # no held-out goods: no normal level, no threshold
        return DisplayLevels(0.0, high, math.nan)
    sample = val_rows[np.linspace(0, len(val_rows) - 1, min(len(val_rows), _NORMAL_SAMPLE))
                      .astype(int)]
    low = float(np.nanmedian(np.asarray(maps[np.sort(sample)], dtype=np.float32)))
    return DisplayLevels(low, max(high, low + 1e-6),
                         threshold_from_good(_peaks(maps, val_rows), quantile))


def overlay_name(image_id: str) -> str:
    """The overlay file's name: the image id without its category (the run is the
    category's), so the defect folder and the original file stem: ``good_cell0004``."""
    parts = image_id.split("/")
    return "_".join(parts[1:] if len(parts) > 1 else parts)


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
    rankings = [ranked(defective, True), ranked(defective, False), ranked(good, True),
                ranked(good, False)]
    picked: list[int] = []
    positions = [0] * len(rankings)
    while len(picked) < min(n, len(labels)):
        for r, ranking in enumerate(rankings):
            while positions[r] < len(ranking) and ranking[positions[r]] in picked:
                positions[r] += 1
            if positions[r] < len(ranking) and len(picked) < n:
                picked.append(int(ranking[positions[r]]))
    return picked


def overlay_picks(folder: Path, test: pd.DataFrame, count: int) -> list[int]:
    """Create the overlay folder; the test images (positions in ``test``) to draw."""
    folder.mkdir()
    if count <= 0:
        return []
    return pick_overlay_examples(test["label"].to_numpy(), test["score"].to_numpy(), n=count)


def worst_patch_view(image_id: str, test_patches: pd.DataFrame, maps: np.ndarray,
                     info: pd.Series) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(image crop, mask crop or None, map) of the image's worst patch (the whole image when
    patches are images): the patch that stands for the image in its overlay."""
    patches = test_patches[test_patches["image_id"] == image_id]
    row = test_patches.loc[patches["score"].idxmax()]
    window = (slice(row.y, row.y + row.height), slice(row.x, row.x + row.width))
    image = read_image(info["path"])[window]
    mask = None
    if isinstance(info["mask_path"], str):
        mask = read_mask(info["mask_path"], (info["height"], info["width"]))[window]
    return image, mask, np.asarray(maps[row.name], dtype=np.float32)


def save_overlays(folder: Path, test: pd.DataFrame, test_patches: pd.DataFrame,
                  maps: np.ndarray, manifest: pd.DataFrame, count: int, method: str,
                  threshold: float, levels: DisplayLevels) -> None:
    """Overlays of ``count`` chosen test images, each shown by its worst patch, on one colour
    scale (so maps compare by eye) with the map threshold outlined."""
    man = manifest.set_index("image_id")
    for pick in overlay_picks(folder, test, count):
        image_id, label, score = test[["image_id", "label", "score"]].iloc[pick]
        image, mask, anomaly_map = worst_patch_view(image_id, test_patches, maps,
                                                    man.loc[image_id])
        save_overlay(image, mask, anomaly_map, folder / f"{overlay_name(image_id)}.png",
                     title=overlay_title(method, image_id, int(label), float(score), threshold),
                     vmin=levels.low, vmax=levels.high, threshold=levels.map_threshold)


def save_full_image_figures(folder: Path, test: pd.DataFrame, test_patches: pd.DataFrame,
                            maps: np.ndarray, manifest: pd.DataFrame, count: int, method: str,
                            threshold: float, levels: DisplayLevels) -> None:
    """Thesis Fig. 6.3 style figures (image, ground truth, stitched map, overlay)."""
    man = manifest.set_index("image_id")
    for pick in overlay_picks(folder, test, count):
        image_id, label, score = test[["image_id", "label", "score"]].iloc[pick]
        info = man.loc[image_id]
        stitched, excluded = stitched_map(test_patches[test_patches["image_id"] == image_id],
                                          maps, info)
        mask = (read_mask(info["mask_path"], (int(info["height"]), int(info["width"])))
                if isinstance(info["mask_path"], str) else None)
        full_image_figure(read_image(info["path"]), mask, stitched, excluded,
                          folder / f"{overlay_name(image_id)}.png",
                          title=overlay_title(method, image_id, int(label), float(score),
                                              threshold),
                          vmin=levels.low, vmax=levels.high, threshold=levels.map_threshold)


@dataclass(frozen=True)
class MethodMaps:
    """One method's part of the grid: its test patches (with ``score``) and maps, image
    scores (``image_id``, ``label``, ``score``), image threshold and display levels."""

    test_patches: pd.DataFrame
    maps: np.ndarray
    images: pd.DataFrame
    threshold: float
    levels: DisplayLevels


def grid_picks(methods: dict[str, MethodMaps], count: int) -> list[str]:
    """The image ids every method scored, chosen as ``pick_overlay_examples`` does on their
    mean rank over the methods (so each method's hits, misses and false alarms can show)."""
    tables = [m.images.set_index("image_id") for m in methods.values()]
    common = sorted(set.intersection(*(set(t.index) for t in tables)))
    if not common or count <= 0:
        return []
    ranks = np.mean([t.loc[common, "score"].rank(pct=True).to_numpy() for t in tables], axis=0)
    labels = tables[0].loc[common, "label"].to_numpy()
    return [common[i] for i in pick_overlay_examples(labels, ranks, n=count)]


def save_method_grid(path: Path, category: str, methods: dict[str, MethodMaps],
                     manifest: pd.DataFrame, count: int = 6) -> Path | None:
    """One PNG: rows = the same test images, columns = methods; each cell the method's
    overlay at its own threshold, titled with its verdict and outcome. None: no image that
    every method scored."""
    picks = grid_picks(methods, count)
    if not picks:
        return None
    man = manifest.set_index("image_id")
    figure = Figure(figsize=(3.2 * len(methods), 3.4 * len(picks)), dpi=80)
    FigureCanvasAgg(figure)
    cells = np.asarray(figure.subplots(len(picks), len(methods), squeeze=False))
    for row, image_id in enumerate(picks):
        info = man.loc[image_id]
        for col, (method, part) in enumerate(methods.items()):
            axes = cells[row, col]
            image, _, anomaly_map = worst_patch_view(image_id, part.test_patches, part.maps, info)
            anomaly_map = cv2.resize(anomaly_map, image.shape[1::-1],
                                     interpolation=cv2.INTER_LINEAR)
            low, high = _scale(anomaly_map, part.levels.low, part.levels.high,
                               part.levels.map_threshold)
            axes.imshow(np.clip(overlay_pixels(image, anomaly_map, low, high,
                                               part.levels.map_threshold), 0, 1))
            score = float(part.images.set_index("image_id").loc[image_id, "score"])
            verdict = ("no threshold" if math.isnan(part.threshold)
                       else outcome(int(info["label"]), score >= part.threshold))
            axes.set_title(f"{method}: {verdict}\n{score:.4g} vs {part.threshold:.4g}",
                           fontsize=9)
            axes.set_xticks([])
            axes.set_yticks([])
            if col == 0:
                axes.set_ylabel(f"{overlay_name(image_id)}\n"
                                f"({'defective' if info['label'] else 'good'})", fontsize=9)
    figure.suptitle(f"{category}: the same test images under every method "
                    "(white outline: above the method's threshold)")
    figure.tight_layout()
    return save_figure(figure, path)
