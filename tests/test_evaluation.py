"""Evaluation on synthetic numbers: metrics, threshold, subsampling, tables and plots."""

from __future__ import annotations

import math
import subprocess
import sys

import cv2
import numpy as np
import pytest

from defectflow.tasks.errors import DefectflowError
from defectflow.tasks.evaluation import (
    image_metrics,
    pick_overlay_examples,
    pixel_metrics,
    plot_roc,
    save_overlay,
    score_table,
    threshold_from_good,
)

LABELS = np.array([0, 0, 0, 0, 1, 1, 1])
SEPARATED = np.array([0.1, 0.2, 0.3, 0.4, 0.7, 0.8, 0.9])


def test_threshold_is_the_quantile_of_good_scores():
    scores = np.arange(101, dtype=float)  # 0..100
    assert threshold_from_good(scores, 0.99) == pytest.approx(99.0)
    assert threshold_from_good(scores, 0.5) == pytest.approx(50.0)
    with pytest.raises(DefectflowError, match="no held-out good images"):
        threshold_from_good(np.array([]))
    with pytest.raises(DefectflowError, match="quantile"):
        threshold_from_good(scores, 1.5)


def test_perfect_separation():
    metrics = image_metrics(LABELS, SEPARATED, threshold=0.5)
    assert metrics["image_auroc"] == 1.0
    assert metrics["image_aupr"] == 1.0
    assert metrics["f1_max"] == 1.0
    assert metrics["f1_max_threshold"] == pytest.approx(0.7)
    assert (metrics["tn"], metrics["fp"], metrics["fn"], metrics["tp"]) == (4, 0, 0, 3)
    assert metrics["precision"] == metrics["recall"] == metrics["accuracy"] == metrics["f1"] == 1.0


def test_threshold_gives_the_expected_confusion():
    scores = np.array([0.1, 0.2, 0.6, 0.8, 0.3, 0.7, 0.9])
    # score >= 0.6 is defective: goods 0.6, 0.8 are false alarms, defect 0.3 is missed.
    metrics = image_metrics(LABELS, scores, threshold=0.6)
    assert (metrics["tn"], metrics["fp"], metrics["fn"], metrics["tp"]) == (2, 2, 1, 2)
    assert metrics["precision"] == pytest.approx(2 / 4)
    assert metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["accuracy"] == pytest.approx(4 / 7)
    assert metrics["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert metrics["image_auroc"] == pytest.approx(9 / 12)  # defect-above-good pairs
    assert metrics["f1_max"] < 1.0
    assert all(isinstance(value, (int, float)) for value in metrics.values())


def test_one_class_gives_nan_without_error():
    metrics = image_metrics(np.zeros(4, dtype=int), np.array([0.1, 0.2, 0.3, 0.4]), threshold=0.25)
    assert math.isnan(metrics["image_auroc"])
    assert math.isnan(metrics["image_aupr"])
    assert math.isnan(metrics["f1_max"])
    assert (metrics["tn"], metrics["fp"], metrics["fn"], metrics["tp"]) == (2, 2, 0, 0)


def test_bad_labels_or_lengths_are_errors():
    with pytest.raises(DefectflowError, match="labels but"):
        image_metrics(LABELS, SEPARATED[:3], threshold=0.5)
    with pytest.raises(DefectflowError, match="0 \\(good\\) or 1"):
        image_metrics(np.array([0, 2]), np.array([0.1, 0.2]), threshold=0.5)


def test_pixel_metrics_on_a_synthetic_map():
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:4, 2:4] = True
    anomaly_map = np.where(mask, 0.9, 0.1)
    anomaly_map[0, 0] = 0.95  # one good pixel above every defective one
    metrics = pixel_metrics([mask, None], [anomaly_map, np.full((8, 8), 0.2)])

    negatives = 128 - 4
    assert metrics["pixel_auroc"] == pytest.approx((negatives - 1) / negatives)
    # Ranked: one false alarm, then the 4 defective pixels: AP = 4/5.
    assert metrics["pixel_aupr"] == pytest.approx(4 / 5)


def test_pixel_metrics_without_defective_pixels_are_nan():
    maps = [np.random.rand(4, 4), np.random.rand(4, 4)]
    metrics = pixel_metrics([None, np.zeros((4, 4), bool)], maps)
    assert math.isnan(metrics["pixel_auroc"]) and math.isnan(metrics["pixel_aupr"])


def test_pixel_metrics_reject_mismatched_sizes():
    with pytest.raises(DefectflowError, match="mask #0"):
        pixel_metrics([np.zeros((4, 4), bool)], [np.zeros((8, 8))])


def test_subsampled_pixel_auroc_is_close_and_reproducible():
    rng = np.random.default_rng(1)
    masks, maps = [], []
    for size in (200, 150, 100):  # different sizes exercise the split across images
        mask = np.zeros((size, size), dtype=bool)
        mask[size // 4 : size // 2, size // 3 : size // 2] = True
        masks.append(mask)
        maps.append(mask * 1.0 + rng.normal(0, 0.8, mask.shape))

    full = pixel_metrics(masks, maps)
    sampled = pixel_metrics(masks, maps, max_pixels=20_000, seed=3)
    # 20,000 of 72,500 pixels (~850 defective): the AUROC estimate's spread over seeds
    # is about 0.006, so 0.02 is a 3-sigma bound.
    assert sampled["pixel_auroc"] == pytest.approx(full["pixel_auroc"], abs=0.02)
    assert sampled["pixel_aupr"] == pytest.approx(full["pixel_aupr"], abs=0.03)
    assert pixel_metrics(masks, maps, max_pixels=20_000, seed=3) == sampled
    assert pixel_metrics(masks, maps, max_pixels=20_000, seed=4) != sampled


def test_score_table():
    table = score_table(["a", "b", "c"], np.array([0, 1, 1]), np.array([0.2, 0.5, 0.4]), 0.45)
    assert list(table.columns) == ["image_id", "label", "score", "prediction"]
    assert table["prediction"].tolist() == [0, 1, 0]
    assert table["label"].tolist() == [0, 1, 1]


def test_pick_overlay_examples_is_informative_and_deterministic():
    labels = np.array([0, 1, 0, 1, 1, 0, 0, 1])
    scores = np.array([0.1, 0.9, 0.8, 0.2, 0.6, 0.3, 0.3, 0.95])
    picked = pick_overlay_examples(labels, scores, n=6)
    # Turns: highest defective 7, lowest defective 3, highest good 2, lowest good 0,
    # then the next not yet picked of the first two rankings: 1 and 4.
    assert picked == [7, 3, 2, 0, 1, 4]
    assert pick_overlay_examples(labels, scores, n=6) == picked
    assert sorted(pick_overlay_examples(labels, scores, n=100)) == list(range(8))
    assert pick_overlay_examples(np.zeros(3, int), np.array([0.3, 0.1, 0.3]), n=2) == [0, 1]


def _assert_png(path, min_width):
    assert path.suffix == ".png" and path.is_file()
    image = cv2.imread(str(path))
    assert image is not None and image.shape[1] >= min_width


def test_plot_roc_writes_a_png(tmp_path):
    path = plot_roc(LABELS, SEPARATED, tmp_path / "plots" / "roc.png", "bottle / patchcore")
    _assert_png(path, 300)
    good_only = np.zeros(3, int), np.array([0.1, 0.2, 0.3])
    _assert_png(plot_roc(*good_only, tmp_path / "one.png", "good only"), 300)


def test_save_overlay_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    mask = np.zeros((96, 128), dtype=bool)
    mask[30:50, 40:70] = True
    small_map = rng.random((24, 32)).astype(np.float32)  # a quarter of the image size

    path = tmp_path / "overlays" / "a.png"
    _assert_png(save_overlay(image, mask, small_map, path, "a", vmin=0, vmax=1), 800)
    _assert_png(save_overlay(image, None, np.zeros((24, 32)), tmp_path / "b.png", "flat"), 800)
    with pytest.raises(DefectflowError, match="mask shape"):
        save_overlay(image, mask[:10], small_map, tmp_path / "c.png", "c")


def test_the_steps_import_neither_scikit_learn_nor_matplotlib():
    # A rerun served from cache imports only what the steps import at the top; the
    # evaluation's names load their modules (scikit-learn, matplotlib) on first use.
    code = ("import sys, defectflow.flows.pipeline, defectflow.tasks.evaluation as e; "
            "e.comparison_table; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'matplotlib'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
