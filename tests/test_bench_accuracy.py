"""bench/accuracy.py on a tiny generated data set: every detector row, seeds, the JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from conftest import make_folder_dataset, textured_image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def accuracy_bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    sys.modules.pop("accuracy", None)
    import accuracy

    return accuracy


def test_accuracy_bench_measures_each_seed_and_setting(tmp_path, accuracy_bench, capsys):
    data = make_folder_dataset(tmp_path / "product", n_good=24, n_bad=8, size=64)
    params = tmp_path / "tiny.yaml"
    params.write_text(yaml.safe_dump({
        "dataset": {"layout": "folder", "path": str(data), "category": "product"},
        "features": {"input_size": 64, "layers": ["blocks.2", "blocks.3"]},
        "methods": {"patchcore": {"coreset_ratio": 0.2}},
        "cache_dir": str(tmp_path / "cache"),
    }))
    out = tmp_path / "accuracy.json"
    result = accuracy_bench.main([
        "--datasets", str(params), "--detectors", "patchcore", "padim", "--seeds", "2",
        "--setting", "params", "--setting", "b34: features.layers=[blocks.3,blocks.4]",
        "--json", str(out)])

    rows = result["rows"]
    assert len(rows) == 2 * 2 * 2  # settings x seeds x detectors
    assert {r["seed"] for r in rows} == {0, 1}
    assert {(r["setting"], r["detector"]) for r in rows} == {
        (s, d) for s in ("params", "b34") for d in ("patchcore", "padim")}
    for row in rows:
        assert row["dataset"] == "tiny"
        # The generated defects are obvious: every detector ranks them first, and they have masks.
        assert row["image_auroc"] > 0.8
        assert 0.5 < row["pixel_auroc"] <= 1.0 and 0 < row["aupro"] <= 1.0
        assert row["fit_s"] > 0 and row["score_s"] > 0

    summary = {(e["setting"], e["detector"]): e for e in result["summary"]}
    entry = summary[("b34", "padim")]
    values = [r["image_auroc"] for r in rows if (r["setting"], r["detector"]) == ("b34", "padim")]
    assert entry["image_auroc"][0] == pytest.approx(sum(values) / 2)
    assert entry["seeds"] == [0, 1]
    assert json.loads(out.read_text())["summary"] == result["summary"]
    table = capsys.readouterr().out
    assert "| tiny" in table and "pixel AUROC" in table and "± " in table


def make_bsdata_root(root: Path, n_good: int = 16, n_bad: int = 6) -> Path:
    """BSData's layout, small: 64 x 128 JPEGs in data/, a LabelMe polygon per defective
    image in label/, image_data.json giving good images no split (as published)."""
    rng = np.random.default_rng(3)
    (root / "data").mkdir(parents=True)
    (root / "label").mkdir()
    entries = []
    for i in range(n_good + n_bad):
        name = f"spindle{i:02d}"
        image = textured_image(rng, 128)[:64]
        if i >= n_good:  # a dark square with a bright rim, somewhere on the spindle
            x, y = int(rng.integers(8, 100)), int(rng.integers(8, 40))
            cv2.rectangle(image, (x - 2, y - 2), (x + 13, y + 13), (250, 250, 250), -1)
            cv2.rectangle(image, (x, y), (x + 11, y + 11), (20, 20, 20), -1)
            corners = [[x - 2, y - 2], [x + 13, y - 2], [x + 13, y + 13], [x - 2, y + 13]]
            (root / "label" / f"{name}.json").write_text(json.dumps({
                "imageWidth": 128, "imageHeight": 64, "imageData": None, "shapes": [
                    {"label": "Pitting", "points": corners, "shape_type": "polygon"}]}))
        cv2.imwrite(str(root / "data" / f"{name}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
        entries.append({"filename": f"{name}.jpg", "train_test_split": None})
    (root / "image_data.json").write_text(json.dumps({"images": entries}))
    return root


def test_accuracy_bench_on_bsdata_patches_reports_aupro(tmp_path, accuracy_bench):
    """BSData as the bench runs it: params/bsdata.yaml (PatchCore with hnsw search), the data
    where ``--data`` points, images cut into windows and the maps stitched back; AUPRO comes
    from the stitched maps like pixel AUROC (it was missing for patched data sets)."""
    root = make_bsdata_root(tmp_path / "bsdata")
    result = accuracy_bench.main([
        "--datasets", "bsdata", "--data", f"bsdata={root}", "--detectors", "patchcore", "padim",
        "--seeds", "1", "--json", str(tmp_path / "accuracy.json"),
        "--set", "patches.size=64", "--set", "patches.stride=64",
        "--set", "features.input_size=64", "--set", f"cache_dir={tmp_path / 'cache'}"])
    rows = result["rows"]
    assert [(r["dataset"], r["detector"]) for r in rows] == [
        ("bsdata", "patchcore"), ("bsdata", "padim")]
    for row in rows:
        assert row["images"] == 22  # every image, cut into two 64 px windows
        assert row["image_auroc"] > 0.8
        assert 0.5 < row["pixel_auroc"] <= 1.0 and 0.3 < row["aupro"] <= 1.0


def test_report_prints_the_table_of_an_interrupted_run(tmp_path, accuracy_bench, capsys):
    """``--report``: the JSON a run left (here cut short in its second seed) printed as the
    table, with the number of seeds each row has when they differ."""
    def row(detector, seed, auroc, **types):
        return dict(dataset="bsdata", setting="params", detector=detector, seed=seed,
                    image_auroc=auroc, pixel_auroc=0.9, aupro=0.7, fit_s=10.0 + seed,
                    score_s=2.0, features_s=1.0, images=10,
                    **{f"pixel_auroc.{kind}": value for kind, value in types.items()})

    saved = tmp_path / "run.json"
    saved.write_text(json.dumps({"command": "bench/accuracy.py --seeds 3", "started": "now",
                                 "rows": [row("padim", 0, 0.8, crack=0.95, uneven=0.70),
                                          row("msflow", 0, 0.9, crack=0.99),
                                          row("padim", 1, 0.9, crack=0.97, uneven=0.80)]}))
    result = accuracy_bench.main(["--report", str(saved)])
    out = capsys.readouterr().out
    table, _, types = out.partition("per defect type")
    assert "bench/accuracy.py --seeds 3" in table
    lines = {line.split("|")[3].strip(): line for line in table.splitlines() if "| bsdata" in line}
    assert "0.8500 ± 0.0500" in lines["padim"] and lines["padim"].rstrip(" |").endswith("2")
    assert "0.9000 ± 0.0000" in lines["msflow"] and lines["msflow"].rstrip(" |").endswith("1")
    assert "10.5 ± 0.5" in lines["padim"]
    assert [e["seeds"] for e in result["summary"]] == [[0, 1], [0]]
    # Each defect type's pixel AUROC over the seeds, the lowest type named; a type a row
    # lacks is "-".
    assert result["summary"][0]["pixel_auroc_by_type"] == {
        "crack": [pytest.approx(0.96), pytest.approx(0.01)],
        "uneven": [pytest.approx(0.75), pytest.approx(0.05)]}
    type_lines = {line.split("|")[3].strip(): [c.strip() for c in line.split("|")[4:-1]]
                  for line in types.splitlines() if "| bsdata" in line}
    assert type_lines["padim"] == ["0.960 ± 0.010", "0.750 ± 0.050", "uneven 0.750"]
    assert type_lines["msflow"] == ["0.990 ± 0.000", "-", "crack 0.990"]


def test_a_setting_that_names_a_bad_value_is_a_one_line_error(accuracy_bench):
    from defectflow.tasks.errors import DefectflowError

    with pytest.raises(DefectflowError, match="--set"):
        accuracy_bench.Setting.parse("bad: features.layers=[unclosed")


def test_a_bad_setting_stops_the_bench_before_any_measurement(tmp_path, accuracy_bench, capsys):
    # The second setting is invalid only once loaded (PaDiM takes 1 to 3 layers): it must be
    # found before the first setting's seeds are measured, not after them.
    params = tmp_path / "tiny.yaml"
    params.write_text(yaml.safe_dump({
        "dataset": {"layout": "folder", "path": str(tmp_path / "nowhere"), "category": "x"},
        "features": {"input_size": 64, "layers": ["blocks.2", "blocks.3"]},
        "cache_dir": str(tmp_path / "cache")}))
    out = tmp_path / "accuracy.json"
    with pytest.raises(SystemExit) as stopped:
        accuracy_bench.main([
            "--datasets", str(params), "--detectors", "padim", "--seeds", "1",
            "--setting", "params",
            "--setting", "four layers: features.layers=[blocks.1,blocks.2,blocks.3,blocks.4]",
            "--json", str(out)])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "PaDiM needs 1 to 3 distinct layers" in err[0]
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_dark_scene_bench_prints_each_seed_and_refuses_bad_settings(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import dark_scene

    assert dark_scene.main(["--detector", "patchcore", "--seeds", "1"]) == [
        pytest.approx(0.985, abs=0.02)]   # tests/test_dark_background.py's PatchCore figure
    out = capsys.readouterr().out
    assert "seed 0: pixel AUROC" in out and "patchcore (defaults): min" in out
    for bad in (["--set", "shrinkage=2"], ["--set", "shrink=0"], ["--set", "seed=1"],
                ["--set", "shrinkage"], ["--seeds", "0"]):
        with pytest.raises(SystemExit) as stop:
            dark_scene.main(["--detector", "padim", *bad])
        assert stop.value.code == 2
        assert capsys.readouterr().err.count("\n") == 1


def test_separability_bench_probes_each_defect_type_against_the_distances(tmp_path, monkeypatch,
                                                                         capsys):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    sys.modules.pop("separability", None)
    import separability

    data = make_folder_dataset(tmp_path / "product", n_good=24, n_bad=10, size=64)
    params = tmp_path / "tiny.yaml"
    params.write_text(yaml.safe_dump({
        "dataset": {"layout": "folder", "path": str(data), "category": "product"},
        "features": {"input_size": 64, "layers": ["blocks.2", "blocks.3"]},
        "cache_dir": str(tmp_path / "cache"),
    }))
    out = tmp_path / "separability.json"
    results = separability.main(["--datasets", str(params), "--shots", "2", "--json", str(out)])

    [blob] = results
    assert blob["type"] == "blob" and blob["images"] == 10
    # A dark blob on stripes: the probe (trained on other images' masks) and both distances
    # (trained on good images only) all find it, inside its image and across images.
    for name in ("probe", "knn", "mahalanobis", "probe_2shot"):
        assert blob[f"{name}_pooled"] > 0.9 and blob[f"{name}_within"] > 0.9, name
    printed = capsys.readouterr().out
    assert "| blob | 10 |" in printed and "probe_2shot pooled / within" in printed
    assert json.loads(out.read_text())["results"] == results

    bad_runs = (["--shots", "0"],
                ["--set", "patches.size=32"],
                ["--setting", "deep: features.layers=[blocks.9]"])
    for bad in bad_runs:
        with pytest.raises(SystemExit) as stop:
            separability.main(["--datasets", str(params), *bad])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("separability.py: "), err
