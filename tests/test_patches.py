import cv2
import numpy as np
import pandas as pd
import pytest

from defectflow.tasks.errors import DefectflowError
from defectflow.tasks.normalization import channel_stats, normalization_stats
from defectflow.tasks.patches import grid_positions, patch_windows, plan_patches


def test_grid_positions_follow_thesis_formula_and_cover_the_edge():
    # floor((300 - 224) / 112) + 1 = 1 window, plus one flush with the edge.
    assert grid_positions(300, 224, 112) == [0, 76]
    # Exact fit: floor((448 - 224) / 112) + 1 = 3 windows and no extra one.
    assert grid_positions(448, 224, 112) == [0, 112, 224]
    assert grid_positions(100, 224, 112) == [0]
    for length, size, stride in [(1000, 224, 112), (517, 64, 48), (65, 64, 1)]:
        pos = grid_positions(length, size, stride)
        assert pos[0] == 0 and pos[-1] + size == length
        assert len(pos) in ((length - size) // stride + 1, (length - size) // stride + 2)
    with pytest.raises(DefectflowError):
        grid_positions(100, 0, 10)


def test_whole_image_is_one_patch():
    assert patch_windows(300, 200, None, None) == [(0, 0, 300, 200)]


def _manifest(tmp_path, image, mask=None, label=0):
    path = tmp_path / "img.png"
    cv2.imwrite(str(path), image)
    mask_path = None
    if mask is not None:
        mask_path = str(tmp_path / "img_mask.png")
        cv2.imwrite(mask_path, mask)
    return pd.DataFrame([dict(image_id="c/good/img", path=str(path), split="test", label=label,
                              defect_type="good", mask_path=mask_path, category="c",
                              width=image.shape[1], height=image.shape[0], channels=3,
                              content_hash="x")])


def test_plan_patches_drops_dark_patches_and_labels_from_mask(tmp_path):
    image = np.full((128, 192, 3), 200, np.uint8)
    image[:, :64] = 10          # black background on the left third
    mask = np.zeros((128, 192), np.uint8)
    mask[100:110, 170:180] = 255  # defect in the bottom-right window
    table = plan_patches(_manifest(tmp_path, image, mask, label=1), patch_size=64, stride=64)
    assert set(table["x"]) == {64, 128}                  # x=0 column dropped (mean 10 <= 31)
    assert len(table) == 4
    defective = table[table["label"] == 1]
    assert list(zip(defective["x"], defective["y"])) == [(128, 64)]
    assert table["patch_id"].is_unique


def test_plan_patches_keeps_one_window_of_an_all_dark_image(tmp_path):
    table = plan_patches(_manifest(tmp_path, np.zeros((64, 64, 3), np.uint8)), 32, 32)
    assert len(table) == 1


def test_mask_of_other_size_is_an_error_naming_the_mask(tmp_path):
    manifest = _manifest(tmp_path, np.full((64, 64, 3), 99, np.uint8),
                         mask=np.zeros((60, 64), np.uint8))
    with pytest.raises(DefectflowError, match="img_mask.png.*differs"):
        plan_patches(manifest)


def test_channel_stats_match_numpy_over_training_patches(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(96, 96, 3), dtype=np.uint8)
    manifest = _manifest(tmp_path, image)
    manifest["split"] = "train"
    table = plan_patches(manifest, patch_size=48, stride=48, min_mean_intensity=0)
    stats = channel_stats(table, dict(zip(manifest.image_id, manifest.path)))
    rgb = image[:, :, ::-1] / 255.0  # written as BGR by OpenCV, read back as RGB
    np.testing.assert_allclose(stats["mean"], rgb.reshape(-1, 3).mean(0), atol=1e-5)
    np.testing.assert_allclose(stats["std"], rgb.reshape(-1, 3).std(0), atol=1e-5)
    assert normalization_stats(table, {}, "imagenet")["mean"] == [0.485, 0.456, 0.406]
    with pytest.raises(DefectflowError):
        normalization_stats(table, {}, "bogus")
