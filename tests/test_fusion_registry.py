"""End to end: a pipeline run with two detectors registers its SegAD fusion as an MLflow model
version; the fusion pyfunc scores images with the forest the fusion step saved, on the same
maps as the pipeline, and ``defectflow score`` serves it on an inbox."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import make_folder_dataset
from defectflow.cli import main
from test_flow import write_params
from test_score_inbox import _inbox

FUSION = "df-generated-product-segad_fusion"


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    """PatchCore + PaDiM on generated images, fused (one seed) and registered."""
    tmp = tmp_path_factory.mktemp("fusion-registry")
    # Enough held-out good images (30% of 48) that XGBoost's trees can split at all.
    data = make_folder_dataset(tmp / "product", n_good=60, n_bad=20)
    # The paper setting: the served fusion is a forest on every seed (the auto setting's
    # stacker and single detector are served through the same FusionConfig.fitted, tested
    # in test_fusion.py).
    params = write_params(tmp, data, fusion={"seeds": 1, "n_defective": 8, "segments": 4,
                                             "setting": "paper"},
                          registry={"enabled": True, "name_prefix": "df"})
    text = yaml.safe_load(params.read_text())
    text["dataset"]["validation_fraction"] = 0.3
    text["methods"] = {"patchcore": {"coreset_ratio": 0.5}, "padim": {}}
    text["evaluation"] = {"overlays": 1}
    params.write_text(yaml.safe_dump(text))
    assert main(["run", str(params), "--quiet"]) == 0
    return tmp, f"sqlite:///{tmp / 'mlflow.db'}", params


def _pipeline_maps(tmp: Path, uri: str, method: str) -> tuple[pd.DataFrame, np.ndarray]:
    """(scores table, anomaly maps) of ``method`` from the pipeline's cache: the score folder
    whose scores are those the method's MLflow run logged."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("generated")
    run = next(r for r in client.search_runs([experiment.experiment_id])
               if r.data.tags.get("method") == method)
    target = tmp / "dl" / method
    target.mkdir(parents=True)
    logged = pd.read_csv(client.download_artifacts(run.info.run_id, "scores.csv", str(target)))
    logged = logged.set_index("image_id")["score"]
    for folder in (tmp / "cache" / "scores").iterdir():
        table = pd.read_parquet(folder / "scores.parquet")
        if set(table["image_id"]) >= set(logged.index) and np.allclose(
                table.set_index("image_id").loc[logged.index, "score"], logged):
            return table, np.load(folder / "anomaly_maps.npy")
    raise AssertionError(f"no score folder holds {method}'s scores")


def test_fusion_version_has_tags_metrics_and_alias(fused):
    tmp, uri, _ = fused
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias(FUSION, "champion")
    assert str(version.version) == "1"
    tags = version.tags
    assert tags["method"] == "segad_fusion" and tags["category"] == "product"
    assert tags["detectors"] == "padim,patchcore" and tags["fusion_mode"] == "supervised"
    assert float(tags["threshold"]) == 0.0 and tags["train_seed"] == "0"
    run = client.get_run(version.run_id)
    assert run.data.tags["method"] == "segad_fusion"
    assert run.data.tags["registered_model"] == FUSION
    # registry.metric image_auroc ranks the fusion by its mean over seeds.
    assert float(tags["metric.image_auroc"]) == pytest.approx(run.data.metrics["image_auroc"])
    # The detectors are still registered beside it.
    for method in ("patchcore", "padim"):
        assert client.get_model_version_by_alias(f"df-generated-product-{method}", "champion")


def test_fusion_pyfunc_applies_the_saved_forest_to_the_pipeline_maps(fused):
    tmp, uri, _ = fused
    from xgboost import XGBClassifier

    from defectflow.tasks import fusion as segad
    from defectflow.tasks.fusion.deploy import FUSION_CONFIG_NAME, FusionConfig, fused_map
    from defectflow.tasks.tracking import load_model

    cache = tmp / "cache"
    fusion_dir = next((cache / "fusions").iterdir())
    config = FusionConfig.load(fusion_dir / FUSION_CONFIG_NAME)
    assert list(config.detectors) == ["padim", "patchcore"] and config.threshold == 0.0
    segments = np.load(fusion_dir / "segments.npy")
    forest = XGBClassifier()
    forest.load_model(str(fusion_dir / "forest.json"))
    manifest = pd.read_parquet(next((cache / "manifests").iterdir())).set_index("image_id")

    # The saved forest is the one behind the first seed's evaluation scores.
    evaluated = pd.read_csv(fusion_dir / "scores.csv").query("seed == 0")
    tables, maps = {}, {}
    for method in config.detectors:
        tables[method], maps[method] = _pipeline_maps(tmp, uri, method)

    def detector_maps(image_ids: list[str]) -> list[np.ndarray]:
        per_detector = []
        for method in config.detectors:
            rows = tables[method].reset_index().set_index("image_id").loc[image_ids, "index"]
            per_detector.append(maps[method][rows.to_numpy()])
        return per_detector

    def pipeline_margins(image_ids: list[str]) -> np.ndarray:
        features = segad.feature_matrix(detector_maps(image_ids), segments,
                                        k=config.n_segments)
        return segad.margin_scores(forest, features)

    np.testing.assert_allclose(pipeline_margins(evaluated["image_id"].tolist()),
                               evaluated["score"].to_numpy(), rtol=1e-5, atol=1e-5)

    # A few test images the forest did not train on: three good, three defective.
    chosen = (evaluated.query("label == 0")["image_id"].head(3).tolist()
              + evaluated.query("label == 1")["image_id"].head(3).tolist())
    paths = manifest.loc[chosen, "path"].tolist()
    hidden = tmp / "cache-hidden"
    cache.rename(hidden)  # the model must score from its own artifacts
    try:
        model, resolved = load_model(f"{FUSION}@champion", uri)
        out = model.predict(pd.DataFrame({"path": paths}))
    finally:
        hidden.rename(cache)
    assert resolved["version"] == "1" and resolved["tags"]["method"] == "segad_fusion"
    assert list(out.columns) == ["image", "score", "threshold", "verdict", "anomaly_map"]
    assert list(out["image"]) == paths
    # The served maps are the pipeline's up to float16 rounding. The pipeline extracted these
    # images in other batches; batch size changes the convolutions' summation order, and
    # where a value lies near a rounding boundary of the float16 feature and map stores,
    # that noise becomes a whole float16 step (measured: 0.3% of the pixels, by up to 3e-3
    # here). Detector maps in the wrong order or wrongly scaled change nearly every pixel.
    expected = np.stack([cv2.resize(m, (64, 64), interpolation=cv2.INTER_LINEAR)
                         for m in fused_map(detector_maps(chosen), config)])
    gap = np.abs(np.stack(out["anomaly_map"].tolist()) - expected)
    assert (gap <= 1e-4).mean() > 0.98 and gap.max() < 2e-2, (gap.mean(), gap.max())
    # The forest's margin is piecewise constant in its inputs: those steps can move a segment
    # feature across a split and the margin by a leaf weight (3.7e-4 measured). A wrong
    # forest or map normalization moves it by far more.
    np.testing.assert_allclose(out["score"].to_numpy(), pipeline_margins(chosen),
                               rtol=0, atol=2e-3)
    scores = out["score"].to_numpy()
    assert scores[3:].mean() > scores[:3].mean()
    assert list(out["verdict"]) == ["defective" if s > 0.0 else "good" for s in scores]
    # The map: per-detector normalized maps, averaged, at the image's size; the defects
    # light it up more than the good images.
    first = out["anomaly_map"].iloc[0]
    assert first.shape == (64, 64) and first.dtype == np.float32
    peaks = np.array([m.max() for m in out["anomaly_map"]])
    assert peaks[3:].mean() > peaks[:3].mean()


def test_score_command_serves_the_fusion_champion(fused, tmp_path, capsys):
    _, uri, _ = fused
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    labels = _inbox(inbox)
    assert main(["score", "--model", f"{FUSION}@champion", "--inbox", str(inbox),
                 "--out", str(out), "--tracking-uri", uri]) == 0
    assert "scored 6" in capsys.readouterr().out
    results = pd.read_csv(out / "results.csv")
    assert sorted(results["image"]) == sorted(labels)
    assert set(results["model"]) == {FUSION} and set(results["model_version"]) == {1}
    results["label"] = results["image"].map(labels)
    by_label = results.groupby("label")["score"].mean()
    assert by_label[1] > by_label[0]
    assert (results["verdict"] == np.where(results["score"] > 0.0, "defective", "good")).all()
    for stem in (Path(name).stem for name in labels):
        assert np.load(out / "maps" / f"{stem}.npy").shape == (64, 64)
        assert (out / "overlays" / f"{stem}.png").stat().st_size > 0
    assert (inbox / "quarantine" / "broken.png").is_file()


def test_rerun_from_cache_reuses_the_fusion_version(fused, capsys):
    tmp, uri, params = fused
    from mlflow.tracking import MlflowClient

    assert main(["run", str(params), "--quiet"]) == 0
    assert f"registered {FUSION} version 1" in capsys.readouterr().out
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert [str(v.version) for v in client.search_model_versions(f"name = '{FUSION}'")] == ["1"]
