"""Large-image inspection: annotations, annotated patch planning, stitching, the "large" and
"bsdata" layouts (kitchen-board thesis, sections 3.2.1-3.2.4)."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from defectflow.tasks.annotations import (
    ImageAnnotation,
    annotation_for_image,
    check_annotation,
    excluded_mask,
    labelme_mask,
    load_annotations,
    rasterize_polygons,
)
from defectflow.tasks.datasets import MANIFEST_COLUMNS, count_table, scan_dataset
from defectflow.tasks.errors import DefectflowError
from defectflow.tasks.evaluation.overlays import full_image_figure
from defectflow.tasks.images import read_mask
from defectflow.tasks.patches import annotated_windows, patch_windows, plan_patches
from defectflow.tasks.stitching import covered_pixels, image_score_from_patches, stitch

BSDATA = Path("/work/shared/data/bsdata")


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def union(windows, width, height) -> np.ndarray:
    covered = np.zeros((height, width), bool)
    for x, y, w, h in windows:
        covered[y:y + h, x:x + w] = True
    return covered


# --------------------------------------------------------------------------- annotation files


def test_load_annotations_reads_the_thesis_format(tmp_path: Path) -> None:
    path = write_json(tmp_path / "a.json", {
        "231117_0302_1.jpg": {"labels": [[659, 2231, 600, 1239], [2064, 1792, 404, 294]],
                              "borders": [[617, 161, 3279, 3424]]},
        "only_labels.jpg": {"labels": [[0, 0, 5, 5]]},
        "empty.jpg": {},
    })
    annotations = load_annotations(path)
    assert annotations["231117_0302_1.jpg"] == ImageAnnotation(
        borders=((617, 161, 3279, 3424),),
        labels=((659, 2231, 600, 1239), (2064, 1792, 404, 294)))
    assert annotations["only_labels.jpg"].borders == ()
    assert annotations["empty.jpg"] == ImageAnnotation()
    check_annotation(annotations["231117_0302_1.jpg"], 4000, 4000, path, "231117_0302_1.jpg")
    assert annotation_for_image(str(path), "/x/y/only_labels.jpg").labels == ((0, 0, 5, 5),)
    assert annotation_for_image(None, "/x/y/only_labels.jpg") is None


@pytest.mark.parametrize(
    "content, problem",
    [
        ('{"img.jpg": {"borders": [[0, 0, 10, 10]],}', "not valid JSON"),
        ('[["img.jpg"]]', "JSON object"),
        ('{"img.jpg": [[0, 0, 4, 4]]}', "img.jpg"),
        ('{"img.jpg": {"border": [[0, 0, 10, 10]]}}', "unknown keys"),
        ('{"img.jpg": {"labels": [[0, -1, 10, 10]]}}', "negative"),
        ('{"img.jpg": {"labels": [[0, 0, 0, 10]]}}', "zero width"),
        ('{"img.jpg": {"labels": [[0, 0, 10]]}}', "4 integers"),
        ('{"img.jpg": {"labels": [[0, 0, 1.5, 10]]}}', "4 integers"),
        ('{"img.jpg": {"borders": []}}', "empty"),
        ('{"img.jpg": {"labels": [0, 0, 3, 3]}}', "4 integers"),
    ],
)
def test_malformed_annotations_name_the_file_and_image(tmp_path: Path, content: str,
                                                       problem: str) -> None:
    path = tmp_path / "annotations.json"
    path.write_text(content)
    with pytest.raises(DefectflowError, match=problem) as raised:
        load_annotations(path)
    assert str(path) in str(raised.value)
    if content.startswith('{"img.jpg"') and problem != "not valid JSON":
        assert "'img.jpg'" in str(raised.value)


def test_box_outside_the_image_names_the_file_and_image(tmp_path: Path) -> None:
    annotation = ImageAnnotation(borders=((10, 10, 90, 50),), labels=((90, 0, 20, 20),))
    check_annotation(annotation, 110, 60, tmp_path / "a.json", "img.jpg")
    with pytest.raises(DefectflowError, match=r"'img.jpg'.*labels\[0\].*outside") as raised:
        check_annotation(annotation, 105, 60, tmp_path / "a.json", "img.jpg")
    assert str(tmp_path / "a.json") in str(raised.value)
    with pytest.raises(DefectflowError, match=r"borders\[0\]"):
        check_annotation(annotation, 200, 59, tmp_path / "a.json", "img.jpg")


def test_excluded_mask() -> None:
    annotation = ImageAnnotation(borders=((2, 1, 6, 4),), labels=((3, 2, 2, 1),))
    excluded = excluded_mask(annotation, 10, 8)
    expected = np.ones((8, 10), bool)
    expected[1:5, 2:8] = False
    expected[2:3, 3:5] = True
    np.testing.assert_array_equal(excluded, expected)
    assert not excluded_mask(ImageAnnotation(), 4, 3).any()
    assert not excluded_mask(None, 4, 3).any()
    only_labels = excluded_mask(ImageAnnotation(labels=((0, 0, 2, 2),)), 4, 3)
    assert only_labels.sum() == 4


# --------------------------------------------------------------------------- LabelMe masks


def test_polygons_rasterize_to_the_expected_pixels() -> None:
    yy, xx = np.mgrid[0:12, 0:14]
    triangle = rasterize_polygons([[[0, 0], [9, 0], [0, 9]]], 14, 12)
    np.testing.assert_array_equal(triangle, (xx + yy <= 9))  # the outline counts as inside
    rectangle = rasterize_polygons([[(2.2, 3), (6, 3), (5.9, 8.4), (2, 8)]], 14, 12)
    np.testing.assert_array_equal(rectangle, (xx >= 2) & (xx <= 6) & (yy >= 3) & (yy <= 8))
    assert not rasterize_polygons([], 14, 12).any()


def test_labelme_mask(tmp_path: Path) -> None:
    path = write_json(tmp_path / "img.json", {
        "version": "4.5.6", "imageWidth": 20, "imageHeight": 10, "imageData": None,
        "shapes": [
            {"label": "Pitting", "shape_type": "polygon", "points": [[0, 0], [4, 0], [0, 4]]},
            {"label": "Pitting", "shape_type": "rectangle", "points": [[15, 8], [10, 6]]},
            {"label": "Scratch", "shape_type": "circle", "points": [[15, 2], [17, 2]]},
            {"label": "Pitting", "shape_type": "line", "points": [[0, 9], [19, 9]]},
        ],
    })
    yy, xx = np.mgrid[0:10, 0:20]
    triangle = xx + yy <= 4
    rectangle = (xx >= 10) & (xx <= 15) & (yy >= 6) & (yy <= 8)
    circle = (xx - 15) ** 2 + (yy - 2) ** 2 <= 4
    np.testing.assert_array_equal(labelme_mask(path, 20, 10), triangle | rectangle | circle)
    np.testing.assert_array_equal(labelme_mask(path, 20, 10, labels=["Pitting"]),
                                  triangle | rectangle)
    with pytest.raises(DefectflowError, match="20x10 image") as raised:
        labelme_mask(path, 21, 10)
    assert str(path) in str(raised.value)


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "not valid JSON"),
        ('{"version": "5"}', "not a LabelMe file"),
        ('{"shapes": [{"label": "a", "points": [[1, 2], [3]]}]}', r"shapes\[0\]: points"),
        ('{"shapes": [{"label": "a", "shape_type": "mask", "points": [[1, 2]]}]}',
         "unsupported shape_type"),
        ('{"shapes": ["polygon"]}', "not an object"),
    ],
)
def test_malformed_labelme_names_the_file(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "label.json"
    path.write_text(content)
    with pytest.raises(DefectflowError, match=problem) as raised:
        labelme_mask(path, 8, 8)
    assert str(path) in str(raised.value)


# --------------------------------------------------------------------------- patch planning


def _row(path: Path, image: np.ndarray, split: str, annotation_path, mask=None, label=0):
    cv2.imwrite(str(path), image)
    mask_path = None
    if mask is not None:
        mask_path = str(path.with_name(path.stem + "_groundtruth.png"))
        cv2.imwrite(mask_path, mask)
    return dict(image_id=f"c/{split}/{path.stem}", path=str(path), split=split, label=label,
                defect_type="good", mask_path=mask_path, category="c",
                width=image.shape[1], height=image.shape[0], channels=3, content_hash="x",
                annotation_path=None if annotation_path is None else str(annotation_path))


BORDER = (50, 40, 400, 300)
LABEL = (200, 150, 60, 60)


@pytest.fixture
def annotated_manifest(tmp_path: Path) -> pd.DataFrame:
    """A 600x500 board on black background, one annotated test image, two train images."""
    image = np.zeros((500, 600, 3), np.uint8)
    x, y, w, h = BORDER
    image[y:y + h, x:x + w] = 180
    mask = np.zeros((500, 600), np.uint8)
    mask[300:305, 400:405] = 255  # a tiny defect near the bottom-right of the border
    annotations = write_json(tmp_path / "annotations.json", {
        "test.png": {"borders": [list(BORDER)], "labels": [list(LABEL)]},
        "train_bordered.png": {"borders": [list(BORDER)]},
    })
    rows = [
        _row(tmp_path / "test.png", image, "test", annotations, mask, label=1),
        _row(tmp_path / "train_whole.png", np.full((500, 600, 3), 180, np.uint8), "train",
             annotations),
        _row(tmp_path / "train_bordered.png", image, "train", annotations),
    ]
    return pd.DataFrame(rows)


def test_annotated_test_image_windows_stay_in_borders_and_avoid_labels(
        annotated_manifest: pd.DataFrame) -> None:
    table = plan_patches(annotated_manifest, patch_size=64, stride=48)
    test = table[table["image_id"] == "c/test/test"]
    windows = list(zip(test["x"], test["y"], test["width"], test["height"]))
    bx, by, bw, bh = BORDER
    # Nothing outside the borders.
    assert all(bx <= x and by <= y and x + w <= bx + bw and y + h <= by + bh
               for x, y, w, h in windows)
    # Same grid as the image grid, laid from the border's corner, edge windows included.
    assert sorted(set(test["x"])) == [bx + p for p in (0, 48, 96, 144, 192, 240, 288, 336)]
    assert max(x + w for x, y, w, h in windows) == bx + bw
    assert max(y + h for x, y, w, h in windows) == by + bh
    # No window touches the label box ...
    lx, ly, lw, lh = LABEL
    label_box = union([LABEL], 600, 500)
    assert not (union(windows, 600, 500) & label_box).any()
    # ... and the border is covered except where windows had to be dropped for the label.
    all_windows = annotated_windows(ImageAnnotation(borders=(BORDER,)), 600, 500, 64, 48)
    dropped = [win for win in all_windows if win not in windows]
    assert dropped and all(union([win], 600, 500)[ly:ly + lh, lx:lx + lw].any()
                           for win in dropped)
    border_area = union([BORDER], 600, 500)
    np.testing.assert_array_equal(union(windows, 600, 500) | union(dropped, 600, 500),
                                  border_area)
    # Labels from the ground-truth mask: exactly the windows holding the defect.
    defective = {(x, y) for x, y, w, h in windows
                 if x < 405 and 400 < x + w and y < 305 and 300 < y + h}
    assert set(zip(test.loc[test["label"] == 1, "x"], test.loc[test["label"] == 1, "y"])) \
        == defective
    assert defective
    assert test["patch_id"].is_unique


def test_train_images_use_the_whole_image_or_their_borders(
        annotated_manifest: pd.DataFrame) -> None:
    table = plan_patches(annotated_manifest, patch_size=64, stride=48)
    whole = table[table["image_id"] == "c/train/train_whole"]
    expected = patch_windows(600, 500, 64, 48)
    assert list(zip(whole["x"], whole["y"], whole["width"], whole["height"])) == expected
    bordered = table[table["image_id"] == "c/train/train_bordered"]
    windows = list(zip(bordered["x"], bordered["y"], bordered["width"], bordered["height"]))
    np.testing.assert_array_equal(union(windows, 600, 500), union([BORDER], 600, 500))
    # Without annotations (or when told to ignore them) the plan is the old one.
    ignored = plan_patches(annotated_manifest, 64, 48, use_annotations=False)
    plain = plan_patches(annotated_manifest.drop(columns="annotation_path"), 64, 48)
    pd.testing.assert_frame_equal(ignored, plain)
    assert (plain["image_id"] == "c/test/test").sum() < len(expected)  # dark windows dropped


def test_planner_rejects_a_box_outside_the_image(annotated_manifest: pd.DataFrame,
                                                 tmp_path: Path) -> None:
    path = write_json(tmp_path / "annotations.json",
                      {"test.png": {"borders": [[50, 40, 551, 300]]}})
    with pytest.raises(DefectflowError, match=r"'test.png'.*outside the 600x500") as raised:
        plan_patches(annotated_manifest, 64, 48)
    assert str(path) in str(raised.value)


def test_planner_rejects_labels_covering_the_whole_border(annotated_manifest: pd.DataFrame,
                                                          tmp_path: Path) -> None:
    write_json(tmp_path / "annotations.json",
               {"test.png": {"borders": [list(BORDER)], "labels": [list(BORDER)]}})
    with pytest.raises(DefectflowError, match="'test.png'.*labels box"):
        plan_patches(annotated_manifest, 64, 48)


# --------------------------------------------------------------------------- stitching


def _ramp(width: int, height: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    return 0.5 * xx + 0.25 * yy


def test_stitching_full_size_maps_gives_back_the_ramp() -> None:
    width, height = 150, 110
    ramp = _ramp(width, height)
    windows = patch_windows(width, height, 40, 25)  # overlapping, with edge windows
    maps = np.stack([ramp[y:y + h, x:x + w] for x, y, w, h in windows])
    excluded = np.zeros((height, width), bool)
    excluded[10:20, 30:60] = True
    stitched = stitch(maps, windows, width, height, excluded)
    assert stitched.dtype == np.float32 and stitched.shape == (height, width)
    np.testing.assert_allclose(stitched[~excluded], ramp[~excluded], rtol=1e-6)
    assert np.isnan(stitched[excluded]).all()


def test_stitching_averages_overlaps_and_leaves_uncovered_pixels_nan() -> None:
    windows = [(0, 0, 40, 40), (20, 0, 40, 40)]
    maps = np.stack([np.full((8, 8), 1.0), np.full((8, 8), 3.0)]).astype(np.float16)
    stitched = stitch(maps, windows, 80, 50)
    np.testing.assert_array_equal(stitched[:40, :20], 1.0)
    np.testing.assert_array_equal(stitched[:40, 20:40], 2.0)
    np.testing.assert_array_equal(stitched[:40, 40:60], 3.0)
    assert np.isnan(stitched[40:]).all() and np.isnan(stitched[:, 60:]).all()
    truth, scores = covered_pixels(stitched, None)
    assert len(truth) == len(scores) == 40 * 60 and not truth.any()
    with pytest.raises(DefectflowError, match="outside"):
        stitch(maps, [(0, 0, 40, 40), (50, 20, 40, 40)], 80, 50)
    with pytest.raises(DefectflowError, match="2 patch maps but 1 windows"):
        stitch(maps, windows[:1], 80, 50)


def test_stitching_upsamples_small_maps_bilinearly() -> None:
    # Patch maps at a quarter of the window size, sampled from the ramp at their cell centres:
    # bilinear upsampling is exact for a linear ramp, except within half a cell of the edges.
    width, height, size, cells = 200, 160, 64, 16
    ramp = _ramp(width, height)
    windows = patch_windows(width, height, size, 32)
    centres = (np.arange(cells) + 0.5) * size / cells - 0.5
    maps = np.stack([0.5 * (x + centres)[None, :] + 0.25 * (y + centres)[:, None]
                     for x, y, w, h in windows]).astype(np.float32)
    stitched = stitch(maps, windows, width, height)
    error = np.abs(stitched - ramp)
    # OpenCV clamps to the first/last cell centre, 1.5 pixels in: 1.5 * (0.5 + 0.25) at most.
    assert error.max() <= 1.125 + 1e-4
    # Elsewhere, pixels 2+ px inside every window that covers them, it is exact.
    near_window_edge = np.zeros((height, width), bool)
    for x, y, w, h in windows:
        band = np.ones((h, w), bool)
        band[2:-2, 2:-2] = False
        near_window_edge[y:y + h, x:x + w] |= band
    assert error[~near_window_edge].max() < 1e-4
    assert np.median(error) < 1e-4


def test_stitching_a_large_image_keeps_memory_small() -> None:
    width = height = 4000
    windows = patch_windows(width, height, 224, 224)
    maps = np.ones((len(windows), 28, 28), np.float16)
    tracemalloc.start()
    stitched = stitch(maps, windows, width, height)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert not np.isnan(stitched).any() and stitched.max() == 1.0
    # float32 sums + uint16 counts + bool masks: about 8 bytes per pixel, never float64 copies.
    assert peak < 9 * width * height


def test_stitched_pixel_metrics_include_aupro_on_inspected_pixels(tmp_path: Path) -> None:
    """Patch mode (BSData): AUPRO comes from the stitched maps, like pixel AUROC; the
    uncovered strip (x 80-89, no window) counts neither way."""
    from defectflow.tasks.evaluation import stitched_pixel_metrics

    mask = np.zeros((40, 90), bool)
    mask[10:20, 5:15] = True    # found by the map below
    mask[25:35, 50:60] = True   # missed: scored like the background
    mask[0:5, 82:88] = True     # under the uncovered strip: left out
    mask_path = tmp_path / "mask.png"
    cv2.imwrite(str(mask_path), mask.astype(np.uint8) * 255)
    manifest = pd.DataFrame({"image_id": ["good", "bad"], "width": [90, 90],
                             "height": [40, 40], "label": [0, 1],
                             "mask_path": [None, str(mask_path)],
                             "path": ["good.jpg", "bad.jpg"]})
    windows = [(0, 0, 40, 40), (40, 0, 40, 40)]
    rows = pd.DataFrame([{"image_id": i, "x": x, "y": y, "width": w, "height": h}
                         for i in ("good", "bad") for x, y, w, h in windows])
    maps = np.random.default_rng(0).random((4, 40, 40)).astype(np.float32) * 0.5
    maps[2, 10:20, 5:15] = 1.0  # the first region of "bad", in its first window
    metrics = stitched_pixel_metrics(rows, maps, manifest)
    # Two regions count: one found at FPR 0, one ranked among the background.
    assert 0.5 < metrics["aupro"] < 0.75
    assert 0.5 < metrics["pixel_auroc"] < 1.0
    maps[3, 25:35, 10:20] = 1.0  # now the second region is found too
    assert stitched_pixel_metrics(rows, maps, manifest)["aupro"] == pytest.approx(1.0)


def test_image_score_is_the_maximum_patch_score() -> None:
    assert image_score_from_patches([0.1, 0.7, 0.3]) == pytest.approx(0.7)
    with pytest.raises(DefectflowError):
        image_score_from_patches([])


def test_full_image_figure_downscales_large_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    width, height = 2400, 1800
    image = rng.integers(100, 200, (height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), bool)
    mask[900:903, 1200:1203] = True  # a 3-pixel defect must survive the downscaling
    annotation = ImageAnnotation(borders=((100, 100, 2200, 1600),), labels=((300, 300, 400, 200),))
    excluded = excluded_mask(annotation, width, height)
    windows = annotated_windows(annotation, width, height, 224, 224)
    maps = rng.random((len(windows), 28, 28)).astype(np.float32)
    stitched = stitch(maps, windows, width, height, excluded)
    path = full_image_figure(image, mask, stitched, excluded, tmp_path / "fig" / "board.png",
                             "board  score 0.9")
    figure = cv2.imread(str(path))
    assert figure is not None and figure.shape[1] == 1600
    with pytest.raises(DefectflowError, match="mask"):
        full_image_figure(image, mask[:10], stitched, excluded, tmp_path / "x.png", "x")


# --------------------------------------------------------------------------- "large" layout


def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


@pytest.fixture
def large_root(tmp_path: Path) -> Path:
    root = tmp_path / "kitchen"
    rng = np.random.default_rng(0)

    def board() -> np.ndarray:
        return rng.integers(90, 160, (60, 80, 3), dtype=np.uint8)

    defect = np.zeros((60, 80), np.uint8)
    defect[10:14, 20:30] = 255
    for category in ("white", "edges"):
        for i in range(3):
            _write(root / category / "train" / f"t{i}.jpg", board())
        _write(root / category / "test" / "a.png", board())
        _write(root / category / "test" / "a_groundtruth.png", defect)
        _write(root / category / "test" / "b.jpg", board())
        _write(root / category / "test" / "bgroundtruth.png", np.zeros((60, 80), np.uint8))
    write_json(root / "white" / "annotations.json",
               {"a.png": {"borders": [[5, 5, 70, 50]], "labels": [[40, 30, 10, 10]]}})
    return root


def test_large_layout(large_root: Path) -> None:
    manifest = scan_dataset("large", large_root).manifest.set_index("image_id")
    assert list(manifest.reset_index().columns) == list(MANIFEST_COLUMNS)
    assert len(manifest) == 10  # the groundtruth files are masks, not images
    assert not any("groundtruth" in path for path in manifest["path"])
    white = manifest[manifest["category"] == "white"]
    assert (white["annotation_path"] == str(large_root / "white" / "annotations.json")).all()
    assert manifest.loc[manifest["category"] == "edges", "annotation_path"].isna().all()
    assert manifest.loc["white/test/a", "label"] == 1
    assert manifest.loc["white/test/a", "defect_type"] == "defect"
    assert manifest.loc["white/test/a", "mask_path"].endswith("a_groundtruth.png")
    assert manifest.loc["white/test/b", "label"] == 0
    assert manifest.loc["white/test/b", "defect_type"] == "good"
    assert manifest.loc["white/test/b", "mask_path"].endswith("bgroundtruth.png")
    assert (manifest.loc[manifest["split"] == "train", "label"] == 0).all()
    assert dict(manifest["split"].value_counts()) == {"train": 6, "test": 4}
    assert count_table(manifest.reset_index())["n_images"].sum() == 10

    one = scan_dataset("large", large_root / "edges", category="edge-boards").manifest
    assert set(one["category"]) == {"edge-boards"} and len(one) == 5
    selected = scan_dataset("large", large_root, category="white").manifest
    assert set(selected["category"]) == {"white"}

    table = plan_patches(manifest.reset_index(), patch_size=32, stride=16, min_mean_intensity=0)
    a = table[table["image_id"] == "white/test/a"]
    windows = list(zip(a["x"], a["y"], a["width"], a["height"]))
    # Border (5, 5, 70, 50), label (40, 30, 10, 10): only the left column of windows is clear.
    assert windows == [(5, 5, 32, 32), (5, 21, 32, 32), (5, 23, 32, 32)]
    assert a["label"].tolist() == [1, 0, 0]  # the defect at rows 10-13, columns 20-29
    b = table[table["image_id"] == "white/test/b"]
    assert len(b) == len(patch_windows(80, 60, 32, 16)) and not b["label"].any()


def test_large_layout_errors(large_root: Path) -> None:
    write_json(large_root / "white" / "annotations.json",
               {"a.png": {"borders": [[5, 5, 70, 56]]}})
    path = str(large_root / "white" / "annotations.json")
    with pytest.raises(DefectflowError, match="'a.png'.*outside the 80x60") as raised:
        scan_dataset("large", large_root)
    assert path in str(raised.value)

    write_json(large_root / "white" / "annotations.json", {"a.png": {"labels": [[1, 2, 3]]}})
    with pytest.raises(DefectflowError, match="'a.png'"):
        scan_dataset("large", large_root)

    write_json(large_root / "white" / "annotations.json", {"typo.png": {}})
    with pytest.warns(UserWarning, match="typo.png"):
        scan_dataset("large", large_root)

    (large_root / "white" / "test" / "bgroundtruth.png").unlink()
    with pytest.raises(DefectflowError, match="no ground-truth mask") as raised:
        scan_dataset("large", large_root)
    assert "b.jpg" in str(raised.value)

    with pytest.raises(DefectflowError, match="expected <category>/train/"):
        scan_dataset("large", large_root / "white" / "test")


def test_other_layouts_have_no_annotations(folder_dataset: Path) -> None:
    manifest = scan_dataset("folder", folder_dataset).manifest
    assert "annotation_path" in manifest.columns and manifest["annotation_path"].isna().all()


# --------------------------------------------------------------------------- BSData layout


def _labelme(points, width, height) -> dict:
    return {"version": "4.5.6", "flags": {}, "imagePath": "x.jpg", "imageData": None,
            "imageWidth": width, "imageHeight": height,
            "shapes": [{"label": "Pitting", "points": points, "group_id": None,
                        "shape_type": "polygon", "flags": {}}]}


@pytest.fixture
def bsdata_root(tmp_path: Path) -> Path:
    """Six good images, two with pitting (one the authors put in train, one in test)."""
    root = tmp_path / "bsdata"
    rng = np.random.default_rng(1)
    entries = []
    for i in range(8):
        name = f"img{i}.jpg"
        _write(root / "data" / name, rng.integers(50, 200, (40, 90, 3), dtype=np.uint8))
        split = None
        if i >= 6:
            write_json(root / "label" / f"img{i}.json",
                       _labelme([[10, 10], [30, 10], [20, 25]], 90, 40))
            split = "train" if i == 6 else "test"
        entries.append({"filename": name, "train_test_split": split, "type": 2,
                        "wear_dev": [], "annotations": f"img{i}.json" if i >= 6 else None})
    write_json(root / "image_data.json", {"images": entries})
    return root


def test_bsdata_layout_on_generated_data(bsdata_root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    manifest = scan_dataset("bsdata", bsdata_root, materialize_dir=cache).manifest
    manifest = manifest.set_index("image_id")
    assert len(manifest) == 8 and set(manifest["category"]) == {"bsdata"}
    defective = manifest[manifest["label"] == 1]
    assert list(defective.index) == ["bsdata/pitting/img6", "bsdata/pitting/img7"]
    assert (defective["split"] == "test").all()  # the authors' "train" defect too
    assert list(defective["authors_split"]) == ["train", "test"]
    mask_file = cache / "bsdata" / "masks" / "img6.png"
    assert defective.loc["bsdata/pitting/img6", "mask_path"] == str(mask_file)
    expected = rasterize_polygons([[[10, 10], [30, 10], [20, 25]]], 90, 40)
    np.testing.assert_array_equal(read_mask(mask_file), expected)
    good = manifest[manifest["label"] == 0]
    assert good["mask_path"].isna().all() and good["authors_split"].isna().all()
    # The authors give good images no split: a seeded 80% of them train.
    assert dict(good["split"].value_counts()) == {"train": 5, "test": 1}

    # A second scan leaves the masks alone (same pixels: same file, same content hash).
    stamp = mask_file.stat().st_mtime_ns
    again = scan_dataset("bsdata", bsdata_root, materialize_dir=cache).manifest
    assert mask_file.stat().st_mtime_ns == stamp
    pd.testing.assert_frame_equal(again, manifest.reset_index())


def test_bsdata_follows_the_authors_split_of_good_images_when_given(bsdata_root: Path,
                                                                     tmp_path: Path) -> None:
    data = json.loads((bsdata_root / "image_data.json").read_text())
    for i, entry in enumerate(data["images"][:6]):
        entry["train_test_split"] = "test" if i < 3 else "train"
    write_json(bsdata_root / "image_data.json", data)
    manifest = scan_dataset("bsdata", bsdata_root, materialize_dir=tmp_path / "c").manifest
    good = manifest[manifest["label"] == 0].set_index("image_id")
    assert list(good["split"]) == ["test"] * 3 + ["train"] * 3

    (bsdata_root / "image_data.json").write_text("{broken")
    with pytest.warns(UserWarning, match="image_data.json"):
        manifest = scan_dataset("bsdata", bsdata_root, materialize_dir=tmp_path / "c").manifest
    assert (manifest["split"] == "train").sum() == 5


def test_bsdata_malformed_label_file_is_named(bsdata_root: Path, tmp_path: Path) -> None:
    (bsdata_root / "label" / "img7.json").write_text('{"shapes": 3}')
    with pytest.raises(DefectflowError, match="img7.json"):
        scan_dataset("bsdata", bsdata_root, materialize_dir=tmp_path / "c")
    with pytest.raises(DefectflowError, match="no data/ folder"):
        scan_dataset("bsdata", tmp_path / "c")


def test_bsdata_real_data(tmp_path: Path) -> None:
    if not (BSDATA / "data").is_dir():
        pytest.skip("BSData is not on this machine")
    result = scan_dataset("bsdata", BSDATA, materialize_dir=tmp_path)
    manifest = result.manifest
    assert result.skipped == []
    assert len(manifest) == 1104
    assert manifest["mask_path"].notna().sum() == 394
    assert ((manifest["label"] == 1) == manifest["mask_path"].notna()).all()
    assert set(manifest["defect_type"]) == {"good", "pitting"}
    counts = manifest.groupby(["split", "label"]).size().to_dict()
    assert counts == {("train", 0): 568, ("test", 0): 142, ("test", 1): 394}
    assert dict(manifest.loc[manifest["label"] == 1, "authors_split"].value_counts()) == {
        "train": 324, "test": 70}
    masks = sorted((tmp_path / "bsdata" / "masks").glob("*.png"))
    assert len(masks) == 394
    first = manifest[manifest["label"] == 1].iloc[0]
    mask = read_mask(first["mask_path"], expected_hw=(first["height"], first["width"]))
    assert 0 < mask.sum() < mask.size // 10  # pitting: small regions
