"""Region metrics (AUPRO, sPRO), extra image metrics, comparison tables and plots.

The AUPRO/sPRO cases are small enough to compute by hand, and random cases are
checked against a brute-force reference that thresholds the maps one by one.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from defectflow.tasks.errors import DefectflowError
from defectflow.tasks.evaluation import (
    COLUMN_TITLES,
    aupro,
    comparison_table,
    format_table,
    fpr_at_tpr,
    patch_pixel_metrics,
    per_defect_type_auroc,
    per_defect_type_pixel_auroc,
    plot_curves,
    plot_defect_type_bars,
    plot_tsne,
    spro,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------ brute-force reference


def brute_force_area(maps, normal_masks, defects, fpr_limit, thresholds=None):
    """Normalized area under the (s)PRO curve, one full thresholding per threshold.

    ``defects`` lists (image index, bool mask, saturation); the overlap of a
    defect is min(1, flagged pixels / saturation). The area is integrated
    segment by segment, each clipped at ``fpr_limit``.
    """
    if thresholds is None:
        thresholds = np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]
    normal_count = sum(int(n.sum()) for n in normal_masks)
    points = [(0.0, 0.0)]
    for t in thresholds:
        false_positives = sum(int(((m >= t) & n).sum()) for m, n in zip(maps, normal_masks))
        overlaps = [min(1.0, ((maps[i] >= t) & mask).sum() / s) for i, mask, s in defects]
        points.append((false_positives / normal_count, float(np.mean(overlaps))))
    points.append((1.0, points[-1][1]))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x1 <= x0 or x0 >= fpr_limit:
            continue
        x_end = min(x1, fpr_limit)
        y_end = y0 + (y1 - y0) * (x_end - x0) / (x1 - x0)
        area += (x_end - x0) * (y0 + y_end) / 2
    return area / fpr_limit


def regions_of(masks):
    """(image index, region mask, area) for every 8-connected region of every mask."""
    defects = []
    for index, mask in enumerate(masks):
        if mask is None:
            continue
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        for region in range(1, count + 1):
            defects.append((index, labelled == region, int((labelled == region).sum())))
    return defects


def random_case(seed, num_images=4, size=12):
    """Maps with many ties (scores rounded to 0.05) and rectangular defects; one good image."""
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for index in range(num_images):
        anomaly_map = rng.random((size, size))
        if index == 0:
            masks.append(None)
        else:
            mask = np.zeros((size, size), dtype=bool)
            for _ in range(rng.integers(1, 3)):
                y, x = rng.integers(0, size - 3, size=2)
                h, w = rng.integers(1, 4, size=2)
                mask[y : y + h, x : x + w] = True
            anomaly_map[mask] += rng.uniform(0, 0.6)
            masks.append(mask)
        maps.append(np.round(anomaly_map * 20) / 20)
    return masks, maps


def normals_of(masks, maps):
    return [np.ones(m.shape, bool) if k is None else ~k for k, m in zip(masks, maps)]


# ---------------------------------------------------------------------------- AUPRO


def test_aupro_one_region_by_hand():
    # One row: a region of 4 pixels, then 6 normal pixels. Descending scores give
    # R N R N R N N R N N, so the curve is (0, 0) (0, 1/4) (1/6, 1/4) (1/6, 1/2)
    # (2/6, 1/2) (2/6, 3/4) (4/6, 3/4) (4/6, 1) (1, 1).
    scores = np.array([[0.9, 0.7, 0.5, 0.2, 0.8, 0.6, 0.4, 0.3, 0.1, 0.05]])
    mask = np.zeros_like(scores, dtype=bool)
    mask[0, :4] = True
    assert aupro([mask], [scores], fpr_limit=0.5) == pytest.approx(
        (1 / 6 * 1 / 4 + 1 / 6 * 1 / 2 + 1 / 6 * 3 / 4) / 0.5
    )  # = 0.5
    # The limit falls inside a flat stretch: the curve is read at exactly 1/4.
    assert aupro([mask], [scores], fpr_limit=0.25) == pytest.approx(
        (1 / 6 * 1 / 4 + (0.25 - 1 / 6) * 1 / 2) / 0.25
    )
    assert aupro([mask], [scores], fpr_limit=1.0) == pytest.approx(
        1 / 6 * (1 / 4 + 1 / 2 + 3 / 4 + 3 / 4) + 2 / 6 * 1
    )


def test_aupro_tie_is_one_diagonal_segment():
    # Region scores 0.9, 0.5; normal scores 0.5, 0.3, 0.2, 0.1. At threshold 0.5 a
    # region pixel and a normal pixel switch together: (0, 1/2) -> (1/4, 1) straight,
    # neither the optimistic nor the pessimistic staircase.
    scores = np.array([[0.9, 0.5, 0.5, 0.3, 0.2, 0.1]])
    mask = np.array([[True, True, False, False, False, False]])
    # Interpolated inside the diagonal: PRO(0.125) = 0.75.
    assert aupro([mask], [scores], fpr_limit=0.125) == pytest.approx(
        0.125 * (0.5 + 0.75) / 2 / 0.125
    )
    assert aupro([mask], [scores], fpr_limit=0.3) == pytest.approx(
        (0.25 * (0.5 + 1.0) / 2 + 0.05 * 1.0) / 0.3
    )


def test_aupro_perfect_constant_and_inverted_maps():
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:5, 3:6] = True
    perfect = mask.astype(float)
    assert aupro([mask, None], [perfect, np.zeros((8, 8))]) == pytest.approx(1.0)
    # A constant map flags everything at once: the diagonal, fpr_limit / 2.
    assert aupro([mask], [np.full((8, 8), 0.3)], fpr_limit=0.3) == pytest.approx(0.15)
    # The region ranks below every normal pixel: no overlap before FPR 1.
    assert aupro([mask], [1.0 - perfect], fpr_limit=0.3) == pytest.approx(0.0, abs=1e-12)
    assert aupro([mask], [1.0 - perfect], fpr_limit=1.0) == pytest.approx(0.0, abs=1e-12)


def test_aupro_weighs_regions_not_pixels():
    # A one-pixel region found first, a nine-pixel region ranked below all normals.
    # Per region PRO is 1/2 until FPR 1; a per-pixel overlap would be 1/10.
    mask = np.zeros((10, 10), dtype=bool)
    mask[0, 0] = True
    mask[5:8, 5:8] = True
    scores = np.full((10, 10), 0.5)
    scores[0, 0] = 1.0
    scores[5:8, 5:8] = 0.0
    assert aupro([mask], [scores]) == pytest.approx(0.5)
    # Split over two images, the regions still weigh the same.
    small, large = np.zeros_like(mask), mask.copy()
    small[0, 0], large[0, 0] = True, False
    plain = scores.copy()
    plain[0, 0] = 0.5  # a normal pixel in the second image
    assert aupro([small, large], [scores, plain]) == pytest.approx(0.5)


def test_aupro_regions_are_8_connected():
    # Pixels (1,1) and (2,2) touch diagonally: one region, half found (1/2); the
    # separate pixel (6,6) is found (1). 8-connected: (1/2 + 1) / 2 = 3/4;
    # 4-connected it would be (1 + 0 + 1) / 3.
    mask = np.zeros((8, 8), dtype=bool)
    mask[1, 1] = mask[2, 2] = mask[6, 6] = True
    scores = np.full((8, 8), 0.5)
    scores[1, 1] = scores[6, 6] = 1.0
    scores[2, 2] = 0.0
    assert aupro([mask], [scores]) == pytest.approx(0.75)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_matches_brute_force(seed, fpr_limit):
    masks, maps = random_case(seed)
    expected = brute_force_area(maps, normals_of(masks, maps), regions_of(masks), fpr_limit)
    assert aupro(masks, maps, fpr_limit=fpr_limit) == pytest.approx(expected, abs=1e-12)


def test_aupro_binned_matches_brute_force_at_the_same_thresholds():
    masks, maps = random_case(3)
    everything = np.concatenate([m.ravel() for m in maps])
    thresholds = np.linspace(everything.min(), everything.max(), 7)[::-1]
    expected = brute_force_area(
        maps, normals_of(masks, maps), regions_of(masks), 0.3, thresholds
    )
    assert aupro(masks, maps, num_thresholds=7) == pytest.approx(expected, abs=1e-12)
    # Many bins approach the exact value.
    assert aupro(masks, maps, num_thresholds=5000) == pytest.approx(aupro(masks, maps), abs=1e-3)


def test_aupro_undefined_and_bad_input():
    scores = np.random.default_rng(0).random((4, 4))
    assert math.isnan(aupro([None, np.zeros((4, 4), bool)], [scores, scores]))
    assert math.isnan(aupro([np.ones((4, 4), bool)], [scores]))  # no normal pixel
    mask = np.eye(4, dtype=bool)
    with pytest.raises(DefectflowError, match="FPR limit"):
        aupro([mask], [scores], fpr_limit=0.0)
    with pytest.raises(DefectflowError, match="num_thresholds"):
        aupro([mask], [scores], num_thresholds=1)
    with pytest.raises(DefectflowError, match="shape"):
        aupro([mask], [scores[:3]])
    with pytest.raises(DefectflowError, match="2 masks but 1"):
        aupro([mask, mask], [scores])
    bad = scores.copy()
    bad[0, 0] = np.inf
    with pytest.raises(DefectflowError, match="infinite"):
        aupro([mask], [bad])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_leaves_uninspected_nan_pixels_out(seed):
    # NaN marks pixels outside every window of a stitched map: they count neither as
    # normal nor in their region (regions still labelled on the whole mask, so a strip
    # through a defect does not split it). Brute force on the inspected pixels only.
    masks, maps = random_case(seed)
    maps = [m.copy() for m in maps]
    inspected = [np.ones(m.shape, bool) for m in maps]
    for keep in inspected:
        keep[:, 5:7] = False  # an uncovered vertical strip in every image
    for m, keep in zip(maps, inspected):
        m[~keep] = np.nan
    normals = [n & keep for n, keep in zip(normals_of(masks, maps), inspected)]
    defects = [(i, region & inspected[i], int((region & inspected[i]).sum()))
               for i, region, _ in regions_of(masks) if (region & inspected[i]).any()]
    thresholds = np.unique(np.concatenate([m[~np.isnan(m)] for m in maps]))[::-1]
    filled = [np.nan_to_num(m, nan=-1.0) for m in maps]  # brute force: never flagged
    expected = brute_force_area(filled, normals, defects, 0.3, thresholds)
    assert aupro(masks, maps) == pytest.approx(expected, abs=1e-12)
    # A region under the strip only is left out: as if its mask were not there.
    mask = np.zeros((6, 6), bool)
    mask[0:2, 0:2] = mask[4, 4] = True
    scores = np.random.default_rng(seed).random((6, 6)) / 2
    scores[0:2, 0:2] = 1.0  # the inspected region is found first
    scores[4, 4] = np.nan
    plain = mask.copy()
    plain[4, 4] = False
    assert aupro([mask], [scores]) == pytest.approx(aupro([plain], [scores])) == 1.0
    # Scored 0 instead, the second region would count, never found: half the overlap.
    assert aupro([mask], [np.nan_to_num(scores)]) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- sPRO


def test_spro_equals_pro_when_saturation_is_the_area():
    rng = np.random.default_rng(5)
    maps = [rng.random((12, 12)) for _ in range(3)]
    first = np.zeros((12, 12), bool)
    first[1:4, 1:5] = True
    second, third = np.zeros((12, 12), bool), np.zeros((12, 12), bool)
    second[6:9, 2:4] = True
    third[0:2, 8:11] = True
    maps[1][first] += 0.4
    maps[2][second] += 0.2
    defects = [[], [first], [second, third]]
    areas = [[], [12], [6, 6]]
    merged = [None, first, second | third]
    for limit in (0.05, 0.3, 1.0):
        assert spro(defects, areas, maps, fpr_limit=limit) == pytest.approx(
            aupro(merged, maps, fpr_limit=limit), abs=1e-12
        )
    # A saturation above the area is capped at it (as in the MVTec LOCO code).
    assert spro(defects, [[], [1000], [7.5, 99]], maps, fpr_limit=0.3) == pytest.approx(
        aupro(merged, maps, fpr_limit=0.3), abs=1e-12
    )


def test_spro_saturates():
    # A defect of 10 pixels; 3 of them score above every normal pixel, 7 below.
    scores = np.full((10, 10), 0.5)
    mask = np.zeros((10, 10), bool)
    mask[0, :10] = True
    scores[0, :3] = 1.0
    scores[0, 3:10] = 0.0
    # Saturation 2 < 3 found pixels: the defect counts as fully found at FPR 0.
    assert spro([[mask]], [[2]], [scores]) == pytest.approx(1.0)
    # Saturation 4: 3/4 found; plain PRO: 3/10.
    assert spro([[mask]], [[4]], [scores]) == pytest.approx(0.75)
    assert aupro([mask], [scores]) == pytest.approx(0.3)


@pytest.mark.parametrize("seed", [0, 1])
def test_spro_matches_brute_force_with_overlapping_defects(seed):
    rng = np.random.default_rng(seed)
    maps, defects, saturations, brute_defects, normals = [], [], [], [], []
    for index in range(3):
        anomaly_map = np.round(rng.random((10, 10)) * 20) / 20
        masks, limits = [], []
        for _ in range(0 if index == 0 else 2):
            mask = np.zeros((10, 10), bool)
            y, x = rng.integers(0, 6, size=2)
            mask[y : y + 4, x : x + 3] = True  # the two defects may overlap
            anomaly_map[mask] += 0.3
            saturation = float(rng.integers(1, 15))
            masks.append(mask)
            limits.append(saturation)
            brute_defects.append((index, mask, min(saturation, mask.sum())))
        maps.append(anomaly_map)
        defects.append(masks)
        saturations.append(limits)
        normals.append(~np.logical_or.reduce([np.zeros((10, 10), bool)] + masks))
    for limit in (0.05, 0.5):
        expected = brute_force_area(maps, normals, brute_defects, limit)
        assert spro(defects, saturations, maps, fpr_limit=limit) == pytest.approx(
            expected, abs=1e-12
        )


def test_spro_bad_input():
    scores = np.zeros((4, 4))
    mask = np.eye(4, dtype=bool)
    assert math.isnan(spro([[]], [[]], [scores]))
    with pytest.raises(DefectflowError, match="2 defect masks but 1"):
        spro([[mask, mask]], [[3]], [scores])
    with pytest.raises(DefectflowError, match="empty"):
        spro([[np.zeros((4, 4), bool)]], [[3]], [scores])
    with pytest.raises(DefectflowError, match="saturation threshold"):
        spro([[mask]], [[0]], [scores])
    with pytest.raises(DefectflowError, match="shape"):
        spro([[mask[:3]]], [[3]], [scores])
    with pytest.raises(DefectflowError, match="one of each per image"):
        spro([[mask]], [], [scores])


# ---------------------------------------------------------------- image-level extras


def test_fpr_at_tpr_by_hand():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.5, 0.7, 0.8])
    # ROC: (0,0) (0,.25) (0,.5) (.25,.5) (.25,.75) (.25,1) (.5,1) (.75,1) (1,1)
    assert fpr_at_tpr(labels, scores) == pytest.approx(0.25)
    assert fpr_at_tpr(labels, scores, tpr=0.5) == pytest.approx(0.0)  # reached exactly
    # A tie between a good and a defective image: the curve (0,.5) -> (.5,1) is
    # interpolated, TPR .95 at FPR .45.
    assert fpr_at_tpr([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]) == pytest.approx(0.45)
    assert fpr_at_tpr([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == pytest.approx(0.0)
    assert math.isnan(fpr_at_tpr([1, 1], [0.1, 0.2]))
    with pytest.raises(DefectflowError, match="true positive rate"):
        fpr_at_tpr(labels, scores, tpr=0.0)


def test_per_defect_type_auroc_by_hand():
    labels = [0, 0, 0, 1, 1, 1]
    scores = [0.1, 0.4, 0.6, 0.5, 0.9, 0.3]
    types = ["good", "good", "good", "scratch", "scratch", "dent"]
    result = per_defect_type_auroc(labels, scores, types)
    assert list(result) == ["dent", "scratch"]
    assert result["dent"] == pytest.approx(1 / 3)  # 0.3 beats only 0.1
    assert result["scratch"] == pytest.approx(5 / 6)  # 0.5 beats 2 of 3, 0.9 all
    assert math.isnan(per_defect_type_auroc([1, 1], [0.2, 0.3], ["a", "b"])["a"])
    with pytest.raises(DefectflowError, match="defect types"):
        per_defect_type_auroc(labels, scores, types[:-1])


def pixel_case():
    """A good image and two defect types on 2 x 2 maps, small enough to count by hand."""
    maps = [np.array([[0.1, 0.2], [0.3, 0.4]]), np.array([[0.35, 0.05], [0.5, 0.6]]),
            np.array([[0.0, 0.0], [0.0, 0.9]])]
    masks = [None, np.array([[1, 1], [0, 0]], bool), np.array([[0, 0], [0, 1]], bool)]
    return masks, maps, ["good", "band", "dot"], [0, 1, 1]


def test_per_defect_type_pixel_auroc_by_hand():
    masks, maps, types, labels = pixel_case()
    result = per_defect_type_pixel_auroc(masks, maps, types, labels)
    assert list(result) == ["band", "dot"]
    # band: 0.35 beats 3 of its 6 normal pixels (4 good, 2 its own), 0.05 none.
    assert result["band"] == pytest.approx(3 / 12)
    assert result["dot"] == pytest.approx(1.0)  # 0.9 beats the good image and its own zeros
    with pytest.raises(DefectflowError, match="one of each per image"):
        per_defect_type_pixel_auroc(masks, maps, types[:-1], labels)


def test_patch_pixel_metrics_report_each_defect_type(tmp_path):
    masks, maps, types, labels = pixel_case()
    rows = []
    for index, (mask, kind, label) in enumerate(zip(masks, types, labels)):
        path = None
        if mask is not None:
            path = str(tmp_path / f"{index}.png")
            cv2.imwrite(path, mask.astype(np.uint8) * 255)
        rows.append(dict(image_id=f"i{index}", mask_path=path, height=2, width=2,
                         defect_type=kind, label=label, x=0, y=0))
    table = pd.DataFrame(rows)
    metrics = patch_pixel_metrics(table, np.stack(maps).astype(np.float32), table)
    assert metrics["pixel_auroc.band"] == pytest.approx(3 / 12)
    assert metrics["pixel_auroc.dot"] == pytest.approx(1.0)
    # Pooled: 3 defective pixels against 9 normal; 0.35 beats 6, 0.05 the 3 zeros, 0.9 all.
    assert metrics["pixel_auroc"] == pytest.approx((6 + 3 + 9) / 27)
    one_type = table.iloc[:2]
    assert "pixel_auroc.band" not in patch_pixel_metrics(one_type, np.stack(maps[:2]), one_type)


# --------------------------------------------------------------------------- tables


def test_comparison_table_sorts_and_orders_columns():
    rows = [
        {"method": "patchcore", "image_auroc": 0.8, "aupro": 0.5, "seconds": 12.0},
        {"method": "segad", "image_auroc": 0.9, "pixel_auroc": 0.95},
        {"method": "padim", "image_auroc": math.nan},
        {"method": "efficientad", "image_auroc": 0.8},
    ]
    table = comparison_table(rows)
    assert table["method"].tolist() == ["segad", "patchcore", "efficientad", "padim"]
    assert table.columns.tolist() == ["method", "image_auroc", "pixel_auroc", "aupro", "seconds"]
    assert math.isnan(table.loc[0, "aupro"])

    text = format_table(table)
    lines = text.splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[0].split() == table.columns.tolist()
    assert lines[2].startswith("segad ")
    assert "0.900" in lines[2] and "0.950" in lines[2]
    assert lines[5].split()[1:] == ["-", "-", "-", "-"]  # padim: all missing
    assert len({len(line) for line in lines}) == 1  # fixed width

    with pytest.raises(DefectflowError, match="more than once"):
        comparison_table([{"method": "a"}, {"method": "a"}])
    with pytest.raises(DefectflowError, match="no 'method'"):
        comparison_table([{"image_auroc": 0.5}])
    with pytest.raises(DefectflowError, match="no methods"):
        comparison_table([])


def test_comparison_table_by_category_with_chosen_columns_and_titles():
    # The CLI's summary: one row per (category, method), its columns, its headers.
    rows = [
        {"category": "b", "method": "padim", "image_auroc": 0.7, "accuracy": 0.6, "tp": 3},
        {"category": "a", "method": "padim", "image_auroc": 0.6, "f1_max": 0.5},
        {"category": "a", "method": "patchcore", "image_auroc": 0.9, "pixel_auroc": 0.8},
    ]
    columns = ("image_auroc", "pixel_auroc", "f1_max", "accuracy")
    table = comparison_table(rows, columns=columns)
    assert table.columns.tolist() == ["category", "method", *columns]
    assert list(zip(table["category"], table["method"])) == [
        ("a", "patchcore"), ("a", "padim"), ("b", "padim")]
    lines = format_table(table, digits=4, titles=COLUMN_TITLES).splitlines()
    assert lines[0].split() == ["category", "method", "image", "AUROC", "pixel", "AUROC",
                                "F1-max", "(test-tuned)", "accuracy"]
    assert lines[2].split() == ["a", "patchcore", "0.9000", "0.8000", "-", "-"]
    assert len({len(line) for line in lines[:2]}) == 1
    # The same method in two categories is two rows; twice in one category is an error.
    with pytest.raises(DefectflowError, match="a / padim"):
        comparison_table(rows + [{"category": "a", "method": "padim"}])


# ---------------------------------------------------------------------------- plots


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = cv2.imread(str(path))
    assert image is not None and image.shape[0] > 100 and image.shape[1] > 100


def test_plots_write_valid_pngs(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.array([0] * 20 + [1] * 10)
    curves = {
        "patchcore": (labels, labels + rng.normal(0, 0.7, labels.size)),
        "segad": (labels, labels + rng.normal(0, 0.3, labels.size)),
        "one class": (np.zeros(5), rng.random(5)),
    }
    assert_png(plot_curves(curves, tmp_path / "curves.png", "bottle"))

    table = pd.DataFrame(
        {
            "method": ["patchcore", "patchcore", "segad", "segad"],
            "defect_type": ["crack", "stain", "crack", "stain"],
            "auroc": [0.91, 0.7, 0.95, math.nan],
        }
    )
    assert_png(plot_defect_type_bars(table, tmp_path / "nested" / "bars.png"))
    with pytest.raises(DefectflowError, match="columns"):
        plot_defect_type_bars(table.drop(columns="auroc"), tmp_path / "bad.png")

    embeddings = np.vstack([rng.normal(0, 1, (12, 8)), rng.normal(4, 1, (8, 8))])
    names = ["good"] * 12 + ["crack"] * 8
    assert_png(plot_tsne(embeddings, names, tmp_path / "tsne.png"))
    assert_png(plot_tsne(embeddings[:3, :1], [0, 1, 1], tmp_path / "tsne_small.png"))
    with pytest.raises(DefectflowError, match="labels"):
        plot_tsne(embeddings, names[:-1], tmp_path / "bad.png")
    with pytest.raises(DefectflowError, match="curves"):
        plot_curves({}, tmp_path / "none.png", "empty")
