"""Scanning datasets into manifests, splits, count tables and image-property clusters."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from defectflow.tasks.datasets import (
    LAYOUTS,
    MANIFEST_COLUMNS,
    count_table,
    holdout_validation,
    property_table,
    scan_dataset,
)
from defectflow.tasks.errors import DefectflowError
from defectflow.tasks.params import DatasetParams

SIZE = 32


def write_image(path: Path, value: int = 128, size: int = SIZE, channels: int = 3) -> Path:
    """A small image whose pixels vary with ``value``, so files (and hashes) differ."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    shape = (size, size) if channels == 1 else (size, size, channels)
    image = np.clip(value + rng.integers(-5, 6, shape), 0, 255).astype(np.uint8)
    assert cv2.imwrite(str(path), image)
    return path


def write_mask(path: Path, size: int = SIZE, defective: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((size, size), np.uint8)
    if defective:
        mask[4:10, 4:10] = 255
    assert cv2.imwrite(str(path), mask)
    return path


@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    """Two MVTec AD categories; bottle has 10 train, 2 test good, 3 cracks and 1 hole."""
    root = tmp_path / "mvtec"
    for category in ("bottle", "cable"):
        base = root / category
        for i in range(10):
            write_image(base / "train" / "good" / f"{i:03d}.png", 100 + i)
        for i in range(2):
            write_image(base / "test" / "good" / f"{i:03d}.png", 150 + i)
        for i in range(3):
            write_image(base / "test" / "crack" / f"{i:03d}.png", 200 + i)
        write_image(base / "test" / "hole" / "000.jpg", 220)
        write_mask(base / "ground_truth" / "crack" / "000_mask.png")
        write_mask(base / "ground_truth" / "crack" / "001.png")  # the other accepted name
        write_mask(base / "ground_truth" / "hole" / "000_mask.png")
    return root


@pytest.fixture
def tile_root(tmp_path: Path) -> Path:
    """Magnetic Tile layout: 20 free tiles with black masks, 3 cracks, 2 blowholes."""
    root = tmp_path / "tiles"
    folders = (("MT_Free", 20, False), ("MT_Crack", 3, True), ("MT_Blowhole", 2, True))
    for folder, count, defective in folders:
        for i in range(count):
            write_image(root / folder / "Imgs" / f"exp1_num_{i}.jpg", 40 + i, channels=1)
            write_mask(root / folder / "Imgs" / f"exp1_num_{i}.png", defective=defective)
    return root


@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    """Generic layout: 10 good, 3 scratches (masks per defect), 2 dents (flat masks)."""
    root = tmp_path / "boards"
    for i in range(10):
        write_image(root / "good" / f"g{i}.png", 60 + i)
    for i in range(3):
        write_image(root / "scratch" / f"s{i}.png", 160 + i)
        write_mask(root / "masks" / "scratch" / f"s{i}.png")
    for i in range(2):
        write_image(root / "dent" / f"d{i}.jpg", 190 + i)
        write_mask(root / "masks" / f"d{i}_mask.png")
    return root


# --------------------------------------------------------------------------- mvtec


def test_mvtec_folder_of_categories(mvtec_root: Path) -> None:
    result = scan_dataset("mvtec", mvtec_root)
    manifest = result.manifest

    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    assert len(manifest) == 2 * (10 + 2 + 3 + 1)
    assert result.skipped == []
    assert manifest["image_id"].is_unique
    assert list(manifest["image_id"]) == sorted(manifest["image_id"])

    bottle = manifest[manifest["category"] == "bottle"].set_index("image_id")
    assert (bottle["split"] == "train").sum() == 10
    assert set(bottle.loc[bottle["split"] == "train", "defect_type"]) == {"good"}
    assert bottle.loc["bottle/test/good/000", "label"] == 0
    assert bottle.loc["bottle/test/crack/000", "label"] == 1
    # Both mask names are found; a defect without a mask file has None.
    assert bottle.loc["bottle/test/crack/000", "mask_path"].endswith("crack/000_mask.png")
    assert bottle.loc["bottle/test/crack/001", "mask_path"].endswith("crack/001.png")
    assert bottle.loc["bottle/test/crack/002", "mask_path"] is None
    assert bottle.loc["bottle/test/hole/000", "path"].endswith("000.jpg")
    assert bottle.loc["bottle/test/good/000", "mask_path"] is None

    row = bottle.loc["bottle/train/good/000"]
    assert Path(row["path"]).is_absolute()
    assert (row["width"], row["height"], row["channels"]) == (SIZE, SIZE, 3)
    assert len(row["content_hash"]) == 64
    assert manifest["label"].dtype == np.int64


def test_mvtec_single_category_and_selection(mvtec_root: Path) -> None:
    single = scan_dataset("mvtec", mvtec_root / "cable").manifest
    assert set(single["category"]) == {"cable"} and len(single) == 16

    selected = scan_dataset("mvtec", mvtec_root, category="bottle").manifest
    assert set(selected["category"]) == {"bottle"} and len(selected) == 16

    with pytest.raises(DefectflowError, match="'screw' not found"):
        scan_dataset("mvtec", mvtec_root, category="screw")


# --------------------------------------------------------------------------- magnetic tile


def test_magnetic_tile_layout(tile_root: Path) -> None:
    manifest = scan_dataset("magnetic_tile", tile_root).manifest

    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    assert len(manifest) == 25  # the .png masks are not images
    assert set(manifest["category"]) == {"magnetic_tile"}
    assert dict(manifest["defect_type"].value_counts()) == {"good": 20, "crack": 3, "blowhole": 2}
    assert (manifest["label"] == (manifest["defect_type"] != "good")).all()
    # Every image keeps its mask, MT_Free's black ones included.
    assert manifest["mask_path"].notna().all()
    assert all(Path(path).suffix == ".png" for path in manifest["mask_path"])
    assert (manifest["channels"] == 1).all()

    good = manifest[manifest["label"] == 0]
    assert dict(good["split"].value_counts()) == {"train": 16, "test": 4}
    assert (manifest.loc[manifest["label"] == 1, "split"] == "test").all()

    named = scan_dataset("magnetic_tile", tile_root, category="tiles").manifest
    assert set(named["category"]) == {"tiles"}
    assert named["image_id"].str.startswith("tiles/").all()


def test_split_is_seeded_and_deterministic(tile_root: Path) -> None:
    first = scan_dataset("magnetic_tile", tile_root, seed=3).manifest
    again = scan_dataset("magnetic_tile", tile_root, seed=3).manifest
    pd.testing.assert_frame_equal(first, again)

    def train_ids(seed: int) -> set[str]:
        manifest = scan_dataset("magnetic_tile", tile_root, seed=seed).manifest
        return set(manifest.loc[manifest["split"] == "train", "image_id"])

    # 20 choose 16 = 4845 possible splits: other seeds give other ones.
    assert any(train_ids(seed) != train_ids(3) for seed in (4, 5, 6))

    half = scan_dataset("magnetic_tile", tile_root, train_fraction=0.5).manifest
    assert ((half["split"] == "train") & (half["label"] == 0)).sum() == 10


def test_magnetic_tile_without_mt_folders(tmp_path: Path) -> None:
    write_image(tmp_path / "Imgs" / "a.jpg")
    with pytest.raises(DefectflowError, match="no MT_"):
        scan_dataset("magnetic_tile", tmp_path)


def test_real_magnetic_tile_if_present() -> None:
    root = Path("/work/shared/data/magnetic-tile")
    if not root.is_dir():
        pytest.skip("the Magnetic Tile data set is not on this machine")
    manifest = scan_dataset("magnetic_tile", root).manifest
    assert len(manifest) == 1344
    assert (manifest["defect_type"] == "good").sum() == 952
    assert manifest["mask_path"].notna().all()


# --------------------------------------------------------------------------- folder


def test_folder_layout(folder_root: Path) -> None:
    manifest = scan_dataset("folder", folder_root).manifest.set_index("image_id")

    assert len(manifest) == 15
    assert set(manifest["category"]) == {"boards"}  # the root folder's name
    assert manifest.loc["boards/scratch/s1", "mask_path"].endswith("masks/scratch/s1.png")
    assert manifest.loc["boards/dent/d0", "mask_path"].endswith("masks/d0_mask.png")
    assert manifest.loc["boards/dent/d0", "label"] == 1
    assert manifest.loc[manifest["label"] == 0, "mask_path"].isna().all()
    good_splits = manifest.loc[manifest["defect_type"] == "good", "split"]
    assert dict(good_splits.value_counts()) == {"train": 8, "test": 2}

    named = scan_dataset("folder", folder_root, category="kitchen").manifest
    assert set(named["category"]) == {"kitchen"}


def test_corrupt_image_is_skipped_and_reported(folder_root: Path) -> None:
    corrupt = folder_root / "good" / "broken.png"
    corrupt.write_bytes(b"not a png at all")

    with pytest.warns(UserWarning, match="broken.png"):
        result = scan_dataset("folder", folder_root)

    assert len(result.manifest) == 15
    assert [path for path, _ in result.skipped] == [str(corrupt.resolve())]
    assert "decode" in result.skipped[0][1]


def test_mask_of_other_size_raises_naming_the_mask(folder_root: Path) -> None:
    write_mask(folder_root / "masks" / "scratch" / "s2.png", size=SIZE * 2)
    with pytest.raises(DefectflowError, match="s2.png") as raised:
        scan_dataset("folder", folder_root)
    assert "differs" in str(raised.value)


def test_folder_without_good_folder(tmp_path: Path) -> None:
    write_image(tmp_path / "scratch" / "a.png")
    with pytest.raises(DefectflowError, match="no good/ folder"):
        scan_dataset("folder", tmp_path)


def test_dataset_without_usable_images(tmp_path: Path) -> None:
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "bad.jpg").write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(DefectflowError, match="no usable images"):
        scan_dataset("folder", tmp_path)


def test_missing_source_and_unknown_layout(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DefectflowError, match="not found") as raised:
        scan_dataset("folder", missing)
    assert str(missing) in str(raised.value)

    with pytest.raises(DefectflowError) as raised:
        scan_dataset("imagenet", tmp_path)
    assert all(layout in str(raised.value) for layout in LAYOUTS)


def test_params_accept_exactly_the_registered_layouts() -> None:
    for layout in LAYOUTS:
        assert DatasetParams(layout=layout).layout == layout
    with pytest.raises(ValidationError) as raised:
        DatasetParams(layout="imagenet")
    assert all(f"'{layout}'" in str(raised.value) for layout in LAYOUTS)


# --------------------------------------------------------------------------- splits and tables


def test_holdout_validation_moves_only_train_good(tile_root: Path) -> None:
    manifest = scan_dataset("magnetic_tile", tile_root).manifest
    held = holdout_validation(manifest, fraction=0.25, seed=1)

    moved = manifest["split"] != held["split"]
    assert moved.sum() == 4  # a quarter of the 16 train images
    assert (manifest.loc[moved, "split"] == "train").all()
    assert (manifest.loc[moved, "label"] == 0).all()
    assert (held.loc[moved, "split"] == "val").all()
    assert (manifest["split"] == "train").sum() == 16  # the input is left alone
    pd.testing.assert_frame_equal(held, holdout_validation(manifest, fraction=0.25, seed=1))

    # A small share still holds out one image per category.
    assert (holdout_validation(manifest, fraction=0.01)["split"] == "val").sum() == 1


def test_count_table(mvtec_root: Path) -> None:
    manifest = holdout_validation(scan_dataset("mvtec", mvtec_root).manifest, fraction=0.2)
    counts = count_table(manifest)

    assert list(counts.columns) == ["category", "split", "defect_type", "n_images"]
    bottle = counts[counts["category"] == "bottle"]
    assert list(zip(bottle["split"], bottle["defect_type"], bottle["n_images"])) == [
        ("train", "good", 8),
        ("val", "good", 2),
        ("test", "good", 2),
        ("test", "crack", 3),
        ("test", "hole", 1),
    ]
    assert counts["n_images"].sum() == len(manifest)


# --------------------------------------------------------------------------- image properties


def test_property_table_separates_two_kinds_of_image(tmp_path: Path) -> None:
    root = tmp_path / "props"
    (root / "good").mkdir(parents=True)
    for i in range(6):  # bright and smooth
        image = np.full((64, 64, 3), 200 + 5 * i, np.uint8)
        cv2.imwrite(str(root / "good" / f"smooth{i}.png"), image)
    for i in range(6):  # dark with many edges: a checkerboard of varying period
        period = 4 + i % 3
        yy, xx = np.mgrid[:64, :64]
        board = (((yy // period) + (xx // period)) % 2 * (80 + 4 * i)).astype(np.uint8)
        cv2.imwrite(str(root / "good" / f"edgy{i}.png"), np.dstack([board] * 3))
    manifest = scan_dataset("folder", root).manifest

    table = property_table(manifest, seed=0)
    assert list(table.columns) == [
        "image_id",
        "category",
        "brightness",
        "colourfulness",
        "edge_density",
        "property_cluster",
    ]
    clusters = dict(zip(table["image_id"], table["property_cluster"]))
    edgy = {clusters[f"props/good/edgy{i}"] for i in range(6)}
    smooth = {clusters[f"props/good/smooth{i}"] for i in range(6)}
    assert edgy == {0} and smooth == {1}  # numbered darkest first
    assert (table["colourfulness"] == 0).all()  # gray images
    edge_density = table.set_index("image_id")["edge_density"]
    assert edge_density["props/good/smooth0"] == 0 and edge_density["props/good/edgy0"] > 0.2

    fixed = property_table(manifest, n_clusters=3, seed=0)
    assert fixed["property_cluster"].nunique() == 3


def test_property_table_colourfulness(tmp_path: Path) -> None:
    root = tmp_path / "colours"
    write_image(root / "good" / "gray.png", 128)
    red = np.zeros((SIZE, SIZE, 3), np.uint8)
    red[:, :, 2] = 255  # OpenCV writes BGR
    cv2.imwrite(str(root / "good" / "red.png"), red)
    table = property_table(scan_dataset("folder", root).manifest).set_index("image_id")
    assert table.loc["colours/good/red", "colourfulness"] > 50
    assert table.loc["colours/good/gray", "colourfulness"] < 10
    assert (table["property_cluster"] == 0).all()  # too few images to cluster


# --------------------------------------------------------------------------- elpv


@pytest.fixture(scope="session")
def elpv_manifest(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    return scan_dataset("elpv", None, materialize_dir=tmp_path_factory.mktemp("datasets")).manifest


def test_elpv_package(elpv_manifest: pd.DataFrame) -> None:
    manifest = elpv_manifest
    assert len(manifest) == 2624
    assert list(manifest.columns) == [*MANIFEST_COLUMNS, "defect_probability", "source_path"]
    assert set(manifest["category"]) == {"mono", "poly"}
    assert set(manifest["defect_probability"].round(2)) == {0.0, 0.33, 0.67, 1.0}
    assert ((manifest["defect_probability"] == 0) == (manifest["label"] == 0)).all()
    assert set(manifest["defect_type"]) == {"good", "p0.33", "p0.67", "p1.00"}
    assert manifest["mask_path"].isna().all()
    assert ((manifest["width"] == 300) & (manifest["height"] == 300)).all()

    for category, rows in manifest.groupby("category"):
        good = rows[rows["label"] == 0]
        n_train = (good["split"] == "train").sum()
        assert n_train == int(np.floor(0.8 * len(good) + 0.5)), category
        assert set(rows.loc[rows["split"] == "train", "label"]) == {0}
        assert (rows.loc[rows["label"] == 1, "split"] == "test").all()

    paths = [Path(path) for path in manifest["path"]]
    assert all(path.suffix == ".png" and path.is_file() for path in paths)
    assert all(path.parent.name == category for path, category in zip(paths, manifest["category"]))


def test_elpv_ids_and_overlay_names_are_the_package_file_stems(elpv_manifest) -> None:
    from defectflow.tasks.datasets.layouts.elpv import labels_file
    from defectflow.tasks.evaluation.examples import overlay_name

    # labels.csv's fourth line: "images/cell0004.png  0.0  mono" (a good mono cell).
    line = labels_file().read_text().splitlines()[3].split()
    assert line[0] == "images/cell0004.png" and float(line[1]) == 0.0 and line[2] == "mono"
    row = elpv_manifest.set_index("image_id").loc["mono/good/cell0004"]
    assert Path(row["source_path"]) == labels_file().parent / "images" / "cell0004.png"
    assert Path(row["path"]).name == "cell0004.png"
    assert overlay_name("mono/good/cell0004") == "good_cell0004"
    stems = {Path(p).stem for p in elpv_manifest["source_path"]}
    assert stems == {i.split("/")[-1] for i in elpv_manifest["image_id"]}
