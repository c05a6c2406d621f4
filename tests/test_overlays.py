"""Overlays an inspector can act on: verdict in the title, the region above the threshold
outlined, a colour scale from the good images' level with the threshold on its bar, and no
ground-truth panel without a mask."""

from __future__ import annotations

import numpy as np
import pandas as pd

from defectflow.tasks.evaluation.examples import (DisplayLevels, display_levels, grid_picks,
                                                  MethodMaps, overlay_name)
from defectflow.tasks.evaluation.overlays import (CONTOUR_RGB, overlay_figure, overlay_title,
                                                  save_overlay)


def _known_case():
    image = np.full((64, 64, 3), 128, dtype=np.uint8)
    anomaly_map = np.zeros((64, 64), dtype=np.float32)
    anomaly_map[20:40, 10:30] = 10.0  # the region above the threshold: rows 20-39, cols 10-29
    return image, anomaly_map


def test_overlay_outlines_the_region_above_the_threshold_and_says_the_verdict():
    image, anomaly_map = _known_case()
    title = overlay_title("patchcore", "mono/p1.00/cell0004", 1, 4.5, 5.0)
    figure = overlay_figure(image, None, anomaly_map, title, low=0.0, high=12.0, threshold=5.0)

    assert figure._suptitle.get_text() == (
        "patchcore  |  mono/p1.00/cell0004  |  true: defective  |  verdict: good (miss)  |  "
        "score 4.5 vs threshold 5")
    # image, anomaly map, overlay and the map's colour bar: no ground-truth panel.
    titles = [axes.get_title() for axes in figure.axes]
    assert "ground truth" not in " ".join(titles) and len(figure.axes) == 4
    overlay = next(a for a in figure.axes if a.get_title().startswith("overlay"))
    pixels = np.asarray(overlay.images[0].get_array())
    outlined = np.all(np.isclose(pixels, CONTOUR_RGB), axis=2)
    expected = np.zeros((64, 64), dtype=bool)
    expected[20:40, 10:30] = True
    expected[21:39, 11:29] = False  # the outline: the region's border pixels, nothing else
    assert (outlined == expected).all()

    # The colour bar marks the threshold; the scale starts at the given normal level.
    bar = next(a for a in figure.axes if a.get_label() == "<colorbar>")
    assert any(np.allclose(line.get_ydata(), 5.0) for line in bar.lines)
    assert overlay_title("padim", "x", 0, 7.0, 5.0).count("verdict: defective (false alarm)") == 1
    assert "correct pass" in overlay_title("padim", "x", 0, 1.0, 5.0)
    assert "(hit)" in overlay_title("padim", "x", 1, 6.0, 5.0)


def test_a_mask_adds_the_ground_truth_panel(tmp_path):
    image, anomaly_map = _known_case()
    mask = anomaly_map > 0
    figure = overlay_figure(image, mask, anomaly_map, "t", low=0.0, high=12.0, threshold=5.0)
    assert [a.get_title() for a in figure.axes][:2] == ["image", "ground truth"]
    assert save_overlay(image, mask, anomaly_map[::4, ::4], tmp_path / "o.png", "t",
                        vmin=0, vmax=12, threshold=5.0).is_file()


def test_display_levels_come_from_the_held_out_good_maps():
    rng = np.random.default_rng(0)
    maps = rng.normal(24.0, 1.0, (40, 8, 8)).astype(np.float32)  # good level about 24
    maps[30:] += 20  # defective test maps
    levels = display_levels(np.arange(0, 20), np.arange(20, 40), maps, 0.99)
    assert abs(levels.low - 24.0) < 0.3
    peaks = maps[:20].max(axis=(1, 2))
    assert levels.map_threshold == np.quantile(peaks, 0.99)
    assert levels.high > levels.map_threshold > levels.low


def test_overlay_names_and_the_grid_use_the_same_images_for_every_method():
    assert overlay_name("mono/good/cell0004") == "good_cell0004"
    images = pd.DataFrame({"image_id": [f"c/t/{i}" for i in range(6)],
                           "label": [0, 0, 0, 1, 1, 1], "score": [1, 2, 3, 4, 5, 6.0]})
    flipped = images.assign(score=images["score"][::-1].to_numpy())
    levels = DisplayLevels(0.0, 1.0, 0.5)
    parts = {m: MethodMaps(pd.DataFrame(), np.zeros((0, 1, 1)), table, 3.5, levels)
             for m, table in (("a", images), ("b", flipped))}
    picks = grid_picks(parts, 4)
    assert len(picks) == 4 and len(set(picks)) == 4
    assert set(picks) <= set(images["image_id"])
