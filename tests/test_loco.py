"""MVTec LOCO AD layout: several mask files per test image merged into one, the saturation
thresholds of defects_config.json used for sPRO, and a flow run end to end (one-class fusion
and the comparison plots included)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import add_defect, textured_image
from defectflow.tasks import datasets
from defectflow.tasks.errors import DefectflowError
from defectflow.tasks.evaluation.localization import spro_metrics

CONFIG = [
    {"defect_name": "blob", "pixel_value": 255, "saturation_threshold": 0.5,
     "relative_saturation": True},
    {"defect_name": "dent", "pixel_value": 200, "saturation_threshold": 30,
     "relative_saturation": False},
]


def make_loco(root: Path, n_train: int = 16, n_val: int = 8, n_good: int = 6, n_bad: int = 4,
              size: int = 64, seed: int = 0) -> Path:
    """<root>/box in the MVTec LOCO layout: every defective image has two defects, each in
    its own mask file (pixel value 255: a blob, 200: a dark square)."""
    rng = np.random.default_rng(seed)
    box = root / "box"
    for folder, count in (("train/good", n_train), ("validation/good", n_val),
                          ("test/good", n_good)):
        (box / folder).mkdir(parents=True)
        for i in range(count):
            cv2.imwrite(str(box / folder / f"{i:03d}.png"), textured_image(rng, size))
    for defect_type in ("logical_anomalies", "structural_anomalies"):
        (box / "test" / defect_type).mkdir(parents=True)
        for i in range(n_bad):
            image, blob = add_defect(textured_image(rng, size), rng)
            dent = np.zeros((size, size), np.uint8)
            x, y = int(rng.integers(2, 10)), int(rng.integers(2, 10))
            dent[y:y + 6, x:x + 6] = 200
            image[dent > 0] = 30
            cv2.imwrite(str(box / "test" / defect_type / f"{i:03d}.png"), image)
            masks = box / "ground_truth" / defect_type / f"{i:03d}"
            masks.mkdir(parents=True)
            cv2.imwrite(str(masks / "000.png"), (blob > 0).astype(np.uint8) * 255)
            cv2.imwrite(str(masks / "001.png"), dent)
    (box / "defects_config.json").write_text(json.dumps(CONFIG))
    return root


def test_loco_scan_merges_masks_and_keeps_saturation_thresholds(tmp_path):
    root = make_loco(tmp_path / "loco")
    manifest = datasets.scan_dataset("mvtec_loco", root, materialize_dir=tmp_path / "mat").manifest
    counts = manifest.groupby(["split", "defect_type"]).size().to_dict()
    assert counts == {("train", "good"): 16, ("val", "good"): 8, ("test", "good"): 6,
                      ("test", "logical_anomalies"): 4, ("test", "structural_anomalies"): 4}
    bad = manifest[manifest["label"] == 1]
    assert len(bad) == 8 and bad["mask_path"].notna().all()
    assert manifest.loc[manifest["label"] == 0, "mask_path"].isna().all()
    row = bad.iloc[0]
    files = sorted((root / "box" / "ground_truth" / row["defect_type"]
                    / Path(row["path"]).stem).glob("*.png"))
    union = np.zeros((64, 64), bool)
    for file in files:
        union |= cv2.imread(str(file), cv2.IMREAD_GRAYSCALE) > 0
    merged = cv2.imread(row["mask_path"], cv2.IMREAD_GRAYSCALE) > 0
    assert np.array_equal(merged, union) and Path(row["mask_path"]).is_relative_to(tmp_path / "mat")
    entries = json.loads(row["defect_masks"])
    assert [(Path(e["path"]).name, e["defect_name"], e["saturation_threshold"],
             e["relative_saturation"]) for e in entries] == [
        ("000.png", "blob", 0.5, True), ("001.png", "dent", 30.0, False)]
    # LOCO's own validation images are the held-out set: no training image is moved.
    held = datasets.holdout_validation(manifest, 0.1, 0)
    assert (held["split"] == manifest["split"]).all()


def test_loco_bad_masks_and_config_name_the_file(tmp_path):
    root = make_loco(tmp_path / "loco", n_train=2, n_val=1, n_good=1, n_bad=1)
    mask = root / "box" / "ground_truth" / "logical_anomalies" / "000" / "001.png"
    cv2.imwrite(str(mask), np.where(cv2.imread(str(mask), 0) > 0, 77, 0).astype(np.uint8))
    with pytest.raises(DefectflowError, match=r"001\.png.*do not name one defect"):
        datasets.scan_dataset("mvtec_loco", root, materialize_dir=tmp_path / "mat")
    config = root / "box" / "defects_config.json"
    config.write_text(json.dumps([{"defect_name": "x", "pixel_value": 77}]))
    with pytest.raises(DefectflowError, match=r"defects_config\.json.*saturation_threshold"):
        datasets.scan_dataset("mvtec_loco", root, materialize_dir=tmp_path / "mat")
    config.write_text(json.dumps([{"defect_name": "x", "pixel_value": 77,
                                   "saturation_threshold": 2.0, "relative_saturation": True}]))
    with pytest.raises(DefectflowError, match="at most 1 when relative"):
        datasets.scan_dataset("mvtec_loco", root, materialize_dir=tmp_path / "mat")


def test_spro_of_the_evaluation_uses_the_saturation_thresholds(tmp_path):
    # Defect A: 20 pixels, absolute saturation 5 pixels; defect B: 10 pixels, relative 0.8
    # (8 pixels). The map flags 5 pixels of each at score 1, all else scores 0. At score 1:
    # FPR 0, overlap (min(1, 5/5) + min(1, 5/8)) / 2 = 0.8125; below it everything is
    # flagged (FPR 1, overlap 1). Area up to FPR 0.05, normalized: the mean of 0.8125 and
    # 0.8125 + 0.05 * 0.1875 = 0.8171875. (PRO without saturation would give 0.25 for A.)
    a = np.zeros((16, 16), np.uint8)
    a[0:4, 0:5] = 255
    b = np.zeros((16, 16), np.uint8)
    b[10:12, 3:8] = 255
    for name, mask in (("a.png", a), ("b.png", b)):
        cv2.imwrite(str(tmp_path / name), mask)
    entries = [{"path": str(tmp_path / "a.png"), "saturation_threshold": 5,
                "relative_saturation": False},
               {"path": str(tmp_path / "b.png"), "saturation_threshold": 0.8,
                "relative_saturation": True}]
    manifest = pd.DataFrame({"image_id": ["bad", "good"], "label": [1, 0], "height": 16,
                             "width": 16, "defect_masks": [json.dumps(entries), None],
                             "mask_path": [str(tmp_path / "a.png"), None]})
    patches = pd.DataFrame({"image_id": ["bad", "good"], "label": [1, 0], "x": 0, "y": 0,
                            "width": 16, "height": 16})
    maps = np.zeros((2, 16, 16), np.float16)
    maps[0, 0, 0:5] = 1.0    # 5 of A's pixels
    maps[0, 10, 3:8] = 1.0   # 5 of B's pixels
    assert spro_metrics(patches, maps, manifest)["spro"] == pytest.approx(0.8171875)
    # At half the resolution an absolute threshold shrinks with the pixels: 5 -> 1.25.
    small = maps[:, ::2, ::2].copy()
    half_patches = patches.assign(width=16, height=16)
    value = spro_metrics(half_patches, small, manifest)["spro"]
    assert 0 < value <= 1 and value != pytest.approx(0.8171875)
    # Without a defects config (no thresholds) there is no sPRO.
    plain = manifest.assign(defect_masks=[json.dumps([{"path": e["path"]} for e in entries]),
                                          None])
    assert spro_metrics(patches, maps, plain) == {}


def test_loco_flow_end_to_end_with_one_class_fusion_and_plots(tmp_path, capsys):
    from defectflow.cli import main

    root = make_loco(tmp_path / "loco")
    params = {
        "dataset": {"layout": "mvtec_loco", "path": str(root), "name": "loco"},
        "features": {"input_size": 64},
        "methods": {"patchcore": {"coreset_ratio": 0.5}, "padim": {}},
        "evaluation": {"overlays": 1, "tsne_points": 20},
        "fusion": {"mode": "one_class", "segments": 4, "seeds": 2},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "cache_dir": str(tmp_path / "cache"),
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    assert main(["run", str(path), "--quiet"]) == 0
    assert "SegAD fusion" in capsys.readouterr().out

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("loco").experiment_id])
    detectors = [r for r in runs if r.data.tags.get("method") in ("patchcore", "padim")]
    assert len(detectors) == 2
    for run in detectors:
        metrics = run.data.metrics
        assert 0 < metrics["spro"] <= 1 and 0 < metrics["aupro"] <= 1
        assert {"image_auroc.logical_anomalies", "image_auroc.structural_anomalies"} <= set(metrics)
    fusion = next(r for r in runs if r.data.tags.get("method") == "segad_fusion")
    assert fusion.data.tags["fusion_mode"] == "one_class"
    assert fusion.data.params["fusion.mode"] == "one_class"
    assert fusion.data.metrics["n_synthetic"] == 2 * 8  # 8 LOCO validation images, 2 seeds
    parent = next(r for r in runs if not r.data.tags.get("mlflow.parentRunId"))
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots/box")}
    assert plots == {"plots/box/curves.png", "plots/box/defect_types.png",
                     "plots/box/tsne.png", "plots/box/overlays.png"}
    # The one-class fusion is a row of the same comparison, with the figure its run logs.
    import pandas as pd

    comparison = pd.read_csv(client.download_artifacts(parent.info.run_id, "comparison.csv",
                                                       str(tmp_path)))
    row = comparison[comparison["method"] == "segad_fusion"].iloc[0]
    assert row["fusion"].startswith("one_class, auto: ")
    assert row["image_auroc"] == pytest.approx(fusion.data.metrics["image_auroc"])
