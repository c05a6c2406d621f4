"""End to end: the CLI runs the Prefect flow on generated images, tracks it in MLflow,
reuses every step on a rerun, and reports bad input in one line without losing anything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from conftest import make_folder_dataset
from defectflow.cli import main


def write_params(tmp: Path, data: Path, **extra) -> Path:
    params = {
        "dataset": {"layout": "folder", "path": str(data), "name": "generated"},
        "features": {"input_size": 64},
        "methods": {"patchcore": {"coreset_ratio": 0.5}},
        "evaluation": {"overlays": 2},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        "cache_dir": str(tmp / "cache"),
        **extra,
    }
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flow")
    data = make_folder_dataset(tmp / "product", n_good=30, n_bad=8)
    params = write_params(tmp, data)
    return tmp, data, params


def test_run_trains_evaluates_tracks_and_reruns_from_cache(first_run, capsys):
    tmp, data, params = first_run
    assert main(["run", str(params)]) == 0
    out = capsys.readouterr().out
    assert "image AUROC" in out and "product" in out and "total time:" in out
    line = next(row for row in out.splitlines() if row.startswith("product "))
    assert float(line.split()[2]) >= 0.95  # image AUROC of the generated defects

    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("generated")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    parents = [r for r in runs if not r.data.tags.get("mlflow.parentRunId")]
    assert len(children) == 1 and len(parents) == 1
    child = children[0]
    assert {k: child.data.tags[k] for k in ("dataset", "category", "method", "backbone")} == {
        "dataset": "generated", "category": "product", "method": "patchcore",
        "backbone": "efficientnet_lite0"}
    assert child.data.metrics["image_auroc"] >= 0.95
    assert {"pixel_auroc", "f1_max", "precision", "recall", "accuracy", "tp", "fp", "tn", "fn",
            "threshold", "aupro", "fpr_at_95_tpr"} <= set(child.data.metrics)
    assert 0.5 < child.data.metrics["aupro"] <= 1.0
    assert child.data.params["features.input_size"] == "64"
    assert child.data.params["method.coreset_ratio"] == "0.5"
    child_files = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"roc.png", "metrics.json", "scores.csv", "overlays", "model"} <= child_files
    assert {a.path for a in client.list_artifacts(child.info.run_id, "model")} >= {
        "model/detector.json", "model/memory_bank.npy"}
    assert len(client.list_artifacts(child.info.run_id, "overlays")) == 2
    parent_files = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"manifest.parquet", "counts.csv", "categories.csv", "steps.csv"} <= parent_files

    # The same run again: every step comes from the cache and a new parent run records it.
    assert main(["run", str(params)]) == 0
    out = capsys.readouterr().out
    steps = [row for row in out.splitlines() if row.startswith("  ")]
    assert steps and all(row.split()[-3] == "cached" for row in steps)
    assert "every step cached" in out
    parents = [r for r in client.search_runs([experiment.experiment_id])
               if not r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 2
    del mlflow



def test_benchmark_preparation_finds_the_pipelines_features(first_run, monkeypatch):
    """The benches prepare data without Prefect; they must hit the pipeline's feature store."""
    from mlflow.tracking import MlflowClient

    from defectflow.tasks.params import load_params

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    from _pipeline import category_features_without_prefect, prepare_without_prefect

    tmp, _, params_path = first_run
    assert main(["run", str(params_path), "--quiet"]) == 0  # from cache after the first test
    params = load_params(params_path)
    scanned, patches, cache = prepare_without_prefect(params)
    assert cache == params.cache_dir
    stats, store = category_features_without_prefect(params, scanned, patches, "product", cache)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("generated")
    logged = {r.data.params["feature_store_key"] for r in client.search_runs(
        [experiment.experiment_id]) if r.data.tags.get("mlflow.parentRunId")
        and r.data.tags.get("method") == "patchcore"}
    assert logged == {store.key}
    assert len(stats["mean"]) == 3 and stats["denoise"] is None

def test_patchcore_receives_the_parameter_object_the_params_validator_built(
        first_run, tmp_path, monkeypatch):
    """``methods.patchcore.coreset_ratio`` travels as one typed object, built once when the
    params file is validated, through the flow and the train step to the coreset selection."""
    from defectflow.tasks import coreset as coreset_mod
    from defectflow.tasks import params as params_mod
    from defectflow.tasks.methods import patchcore as patchcore_mod

    built, received, ratios = [], [], []
    build = params_mod.method_params

    def built_once(*args, **kwargs):
        built.append(build(*args, **kwargs))
        return built[-1]

    fit = patchcore_mod.PatchCore.fit

    def fit_and_record(self, train):
        received.append(self.params)
        return fit(self, train)

    class RecordingCoreset(coreset_mod.StreamingCoreset):
        def __init__(self, ratio, *args, **kwargs):
            ratios.append(ratio)
            super().__init__(ratio, *args, **kwargs)

    monkeypatch.setattr(params_mod, "method_params", built_once)
    monkeypatch.setattr(patchcore_mod.PatchCore, "fit", fit_and_record)
    monkeypatch.setattr(patchcore_mod, "StreamingCoreset", RecordingCoreset)
    _, data, _ = first_run
    # A fresh cache: the detector is fitted, not loaded.
    params = write_params(tmp_path, data, methods={"patchcore": {"coreset_ratio": 0.25}})
    assert main(["run", str(params), "--quiet"]) == 0
    assert len(built) == 1 and len(received) == 1
    assert received[0] is built[0]
    assert ratios == [0.25] and built[0].coreset_ratio == 0.25


def test_corrupt_image_is_skipped_and_counted(first_run, capsys, tmp_path):
    _, data, _ = first_run
    copy = tmp_path / "product"
    make_folder_dataset(copy, n_good=30, n_bad=8)
    (copy / "good" / "g003.png").write_bytes(b"not a png at all")
    params = write_params(tmp_path, copy)
    with pytest.warns(UserWarning, match="g003.png"):
        assert main(["run", str(params), "--quiet"]) == 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("generated")
    parent = next(r for r in client.search_runs([experiment.experiment_id])
                  if not r.data.tags.get("mlflow.parentRunId"))
    assert parent.data.metrics["n_skipped_images"] == 1
    assert "skipped_images.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}


@pytest.mark.parametrize("override, expected", [
    ("dataset.path=/nonexistent/product", "/nonexistent/product: dataset path not found"),
    ("features.backbone=vgg99", "vgg99"),
    ("features.layers=[blocks.2, layer9]", "layer9"),
    ("features.bogus=1", "features.bogus: unknown key"),
    ("patches.size=-4", "patches.size"),
    ("methods.patchcore.coreset_ratio=2", "coreset_ratio"),
])
def test_bad_input_is_one_clear_line(first_run, capsys, override, expected):
    tmp, _, params = first_run
    assert main(["run", str(params), "--set", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("defectflow: error:") and expected in err[0]


def test_unknown_key_in_params_file_names_the_file(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("dataset:\n  layout: elpv\n  colour: blue\n")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(path) in err and "dataset.colour: unknown key" in err


def test_mask_size_error_in_a_flow_run_is_one_line_and_loses_nothing(first_run, tmp_path):
    tmp, data, params = first_run
    cache_before = sorted(p.relative_to(tmp) for p in (tmp / "cache").rglob("*"))
    bad = tmp_path / "product"
    make_folder_dataset(bad, n_good=30, n_bad=8)
    mask = next((bad / "masks" / "blob").glob("*.png"))
    cv2.imwrite(str(mask), np.zeros((10, 12), np.uint8))
    text = Path(params).read_text().replace(str(data), str(bad))
    bad_params = tmp_path / "params.yaml"
    bad_params.write_text(text)  # same cache and MLflow store as the good runs
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "defectflow.cli", "run", str(bad_params),
                             "--quiet"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("defectflow: error:") and mask.name in last and "differs" in last
    # Nothing that was cached before is gone.
    cache_after = {p.relative_to(tmp) for p in (tmp / "cache").rglob("*")}
    assert set(cache_before) <= cache_after


def test_two_detectors_are_fused_without_leakage(tmp_path, capsys):
    # Enough held-out good images (30% of 48) that XGBoost's trees can split at all.
    data = make_folder_dataset(tmp_path / "product", n_good=60, n_bad=20)
    params = write_params(tmp_path, data, fusion={"seeds": 2, "n_defective": 8, "segments": 4})
    text = yaml.safe_load(params.read_text())
    text["dataset"]["validation_fraction"] = 0.3
    text["methods"] = {"patchcore": {"coreset_ratio": 0.5}, "padim": {},
                       "classifier": {"n_defective": 4, "epochs": 2, "lr": 3e-4}}
    params.write_text(yaml.safe_dump(text))
    assert main(["run", str(params), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "SegAD fusion" in out and "padim" in out and "classifier" in out

    import pandas as pd
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("generated")
    runs = client.search_runs([experiment.experiment_id])
    fusion = next(r for r in runs if r.data.tags.get("method") == "segad_fusion")
    assert fusion.data.metrics["image_auroc"] >= 0.9
    assert {"per_seed.csv", "scores.csv", "summary.json"} <= {
        a.path for a in client.list_artifacts(fusion.info.run_id)}
    # One figure: the run's image_auroc is the mean of per_seed.csv's rows, as the CLI and
    # comparison.csv print it; no per-seed metric (the UI would lead with the best seed).
    per_seed = pd.read_csv(client.download_artifacts(fusion.info.run_id, "per_seed.csv",
                                                     str(tmp_path)))
    assert per_seed["seed"].tolist() == [0, 1]
    assert fusion.data.metrics["image_auroc"] == pytest.approx(per_seed["image_auroc"].mean())
    assert fusion.data.metrics["image_auroc_std"] == pytest.approx(
        per_seed["image_auroc"].std(ddof=1))
    assert not client.get_metric_history(fusion.info.run_id, "seed_image_auroc")
    assert fusion.data.tags["fusion_setting"] == "auto" and fusion.data.tags["fusion_choice"]
    parent = next(r for r in runs if r.data.tags.get("mlflow.parentRunId") is None)
    comparison = pd.read_csv(client.download_artifacts(parent.info.run_id, "comparison.csv",
                                                       str(tmp_path)))
    row = comparison[comparison["method"] == "segad_fusion"].iloc[0]
    assert row["image_auroc"] == pytest.approx(fusion.data.metrics["image_auroc"])
    assert f"{fusion.data.metrics['image_auroc']:.4f}" in out
    # No image the fusion trained on is among the images it was evaluated on.
    scores = pd.read_csv(client.download_artifacts(fusion.info.run_id, "scores.csv", str(tmp_path)))
    fusion_folder = next((tmp_path / "cache" / "fusions").iterdir())
    assert set(scores["image_id"]).isdisjoint(
        set(pd.read_parquet(next((tmp_path / "cache" / "manifests").iterdir()))
            .query("split == 'val'")["image_id"]))
    assert fusion_folder.is_dir()
    # The classifier trained on a few labelled defects and never scored them.
    import json

    trained_on = set()
    for folder in (tmp_path / "cache" / "models").iterdir():
        trained_on |= set(json.loads((folder / "train_defects.json").read_text()))
    assert len(trained_on) == 4
    classifier = next(r for r in runs if r.data.tags.get("method") == "classifier")
    (tmp_path / "dl").mkdir()
    scored = pd.read_csv(client.download_artifacts(classifier.info.run_id, "scores.csv",
                                                   str(tmp_path / "dl")))
    assert trained_on.isdisjoint(scored["image_id"]) and len(scored) > 0
    parent = next(r for r in runs if not r.data.tags.get("mlflow.parentRunId"))
    assert "comparison.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}
