"""Export of a scanned dataset to the MVTec AD layout (for anomalib and other tools)."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import add_defect, textured_image
from defectflow.tasks import datasets
from defectflow.tasks.errors import DefectflowError
from defectflow.tasks.export import export_mvtec, limit_manifest
from defectflow.tasks.images import read_image, read_mask


def make_magnetic_tile(root: Path, n_free: int = 10, n_blowhole: int = 4) -> Path:
    """Magnetic Tile's layout: MT_<Defect>/Imgs/<stem>.jpg with a same-stem .png mask."""
    rng = np.random.default_rng(0)
    for folder, count in (("MT_Free", n_free), ("MT_Blowhole", n_blowhole)):
        images = root / folder / "Imgs"
        images.mkdir(parents=True)
        for i in range(count):
            image = textured_image(rng, 48)
            mask = np.zeros((48, 48), np.uint8)
            if folder != "MT_Free":
                image, mask = add_defect(image, rng)
            cv2.imwrite(str(images / f"exp{i}_num_{i}.jpg"), image)
            cv2.imwrite(str(images / f"exp{i}_num_{i}.png"), mask)
    return root


@pytest.fixture
def magnetic_tile(tmp_path):
    root = make_magnetic_tile(tmp_path / "mt")
    return datasets.scan_dataset("magnetic_tile", root, category="magnetic_tile").manifest


def test_export_keeps_split_labels_pixels_and_masks(magnetic_tile, tmp_path):
    out = export_mvtec(magnetic_tile, tmp_path / "out", "magnetic_tile")
    assert out.name == "magnetic_tile"
    assert sorted(p.name for p in out.iterdir()) == ["ground_truth", "test", "train"]

    exported = datasets.scan_dataset("mvtec", out).manifest
    # Same split and labels per image, read back through the MVTec reader.
    def summary(manifest):
        return sorted((row.split, row.defect_type, Path(row.path).stem)
                      for row in manifest.itertuples())
    assert summary(exported) == summary(magnetic_tile)
    assert (exported["split"] == "train").sum() == (magnetic_tile["split"] == "train").sum() > 0

    # Stems repeat across defect folders (as in Magnetic Tile): match on both.
    source = {(r.defect_type, Path(r.path).stem): r for r in magnetic_tile.itertuples()}
    for row in exported.itertuples():
        original = source[row.defect_type, Path(row.path).stem]
        assert Path(row.path).suffix == ".png"  # anomalib reads only .png
        # The JPEG is decoded once and stored losslessly: the same pixels.
        np.testing.assert_array_equal(read_image(row.path), read_image(original.path))
        if row.label:
            np.testing.assert_array_equal(read_mask(row.mask_path),
                                          read_mask(original.mask_path))
            assert set(np.unique(cv2.imread(row.mask_path, cv2.IMREAD_GRAYSCALE))) <= {0, 255}


def test_export_is_reused_and_keyed_on_content(magnetic_tile, tmp_path):
    first = export_mvtec(magnetic_tile, tmp_path / "out", "magnetic_tile")
    marker = first / "train" / "good" / "marker.txt"
    marker.write_text("left by the first export")
    assert export_mvtec(magnetic_tile, tmp_path / "out", "magnetic_tile") == first
    assert marker.exists()  # reused, not rewritten
    smaller = magnetic_tile[magnetic_tile["split"] == "test"].index[:1]
    other = export_mvtec(magnetic_tile.drop(smaller), tmp_path / "out", "magnetic_tile")
    assert other != first and not list(other.parent.parent.glob("*.partial-*"))


def test_export_rejects_defects_without_masks_and_defective_train_images(magnetic_tile, tmp_path):
    no_mask = magnetic_tile.copy()
    defective = no_mask.index[no_mask["label"] == 1][0]
    no_mask.loc[defective, "mask_path"] = None
    with pytest.raises(DefectflowError, match="has no mask") as caught:
        export_mvtec(no_mask, tmp_path / "out", "magnetic_tile")
    assert str(no_mask.loc[defective, "path"]) in str(caught.value)

    bad_train = magnetic_tile.copy()
    bad_train.loc[defective, "split"] = "train"
    with pytest.raises(DefectflowError, match="train image is not good"):
        export_mvtec(bad_train, tmp_path / "out", "magnetic_tile")


def test_limit_manifest_draws_a_seeded_subset_per_defect_type(magnetic_tile):
    subset = limit_manifest(magnetic_tile, max_train=3, max_test_per_type=1, seed=0)
    counts = subset.groupby(["split", "defect_type"]).size().to_dict()
    assert counts == {("train", "good"): 3, ("test", "good"): 1, ("test", "blowhole"): 1}
    again = limit_manifest(magnetic_tile, max_train=3, max_test_per_type=1, seed=0)
    assert subset["image_id"].tolist() == again["image_id"].tolist()
    assert set(subset["image_id"]) <= set(magnetic_tile["image_id"])
