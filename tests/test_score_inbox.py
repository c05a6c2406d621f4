"""End to end: a pipeline run registers its detector, the registered pyfunc reproduces the
pipeline's scores, and ``defectflow score`` scores an inbox once, quarantining a corrupt file."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from conftest import add_defect, make_folder_dataset, textured_image
from defectflow.cli import main
from test_flow import write_params

MODEL = "df-generated-product-patchcore"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A PatchCore model trained on generated images and registered with alias champion."""
    tmp = tmp_path_factory.mktemp("registry")
    data = make_folder_dataset(tmp / "product", n_good=30, n_bad=8)
    params = write_params(tmp, data, registry={"enabled": True, "name_prefix": "df"})
    assert main(["run", str(params), "--quiet"]) == 0
    return tmp, f"sqlite:///{tmp / 'mlflow.db'}"


def _inbox(folder: Path, n_good: int = 3, n_bad: int = 3) -> dict[str, int]:
    """Generated good and defective images (other seeds than training) plus one corrupt file."""
    folder.mkdir()
    rng = np.random.default_rng(123)
    labels = {}
    for i in range(n_good):
        cv2.imwrite(str(folder / f"good{i}.png"), textured_image(rng))
        labels[f"good{i}.png"] = 0
    for i in range(n_bad):
        image, _ = add_defect(textured_image(rng), rng)
        cv2.imwrite(str(folder / f"bad{i}.png"), image)
        labels[f"bad{i}.png"] = 1
    (folder / "broken.png").write_bytes(rng.bytes(300))
    (folder / "notes.txt").write_text("not an image: left alone")
    return labels


def test_registered_version_has_alias_metrics_and_a_self_contained_model(registered):
    tmp, uri = registered
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias(MODEL, "champion")
    assert str(version.version) == "1"
    assert version.tags["method"] == "patchcore" and version.tags["category"] == "product"
    run = client.get_run(version.run_id)
    assert run.data.tags["registered_model"] == MODEL
    assert float(version.tags["threshold"]) == pytest.approx(run.data.metrics["threshold"])
    assert float(version.tags["metric.image_auroc"]) == pytest.approx(
        run.data.metrics["image_auroc"])
    # A description with the figures at the threshold and the inputs; an output signature.
    assert f"{run.data.metrics['image_auroc']:.4f}" in version.description
    assert "recall" in version.description and "`path` column" in version.description
    from mlflow.models import get_model_info

    signature = get_model_info(f"models:/{MODEL}/1").signature
    assert signature.outputs.input_names() == ["image", "score", "threshold", "verdict",
                                               "anomaly_map"]


def test_pyfunc_reproduces_the_pipeline_scores(registered, tmp_path):
    tmp, uri = registered
    from defectflow.tasks.tracking import load_model

    # Remove the pipeline's cache: the model must load and score from its own artifacts.
    cache = tmp / "cache"
    scores_dir = next((cache / "scores").iterdir())
    table = pd.read_parquet(scores_dir / "scores.parquet")
    maps = np.load(scores_dir / "anomaly_maps.npy")
    manifest = pd.read_parquet(next((cache / "manifests").iterdir())).set_index("image_id")
    paths = manifest.loc[table["image_id"], "path"].tolist()
    hidden = tmp / "cache-hidden"
    cache.rename(hidden)
    try:
        model, resolved = load_model(f"{MODEL}@champion", uri)
        out = model.predict(pd.DataFrame({"path": paths}))
        from_arrays = model.predict([cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB)
                                     for p in paths[:2]])
    finally:
        hidden.rename(cache)
    assert resolved["version"] == "1"
    np.testing.assert_allclose(out["score"].to_numpy(), table["score"].to_numpy(),
                               rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(from_arrays["score"].to_numpy(), table["score"].to_numpy()[:2],
                               rtol=1e-3, atol=1e-4)
    # Whole images: the map is the pipeline's map resized to the image (64 px here).
    first = out["anomaly_map"].iloc[0]
    assert first.shape == (64, 64)
    np.testing.assert_allclose(first, maps[0].astype(np.float32), rtol=1e-2, atol=1e-2)
    threshold = out["threshold"].iloc[0]
    assert list(out["verdict"]) == ["defective" if s > threshold else "good"
                                    for s in out["score"]]


def test_score_command_scores_each_image_once_and_quarantines_corrupt_files(
        registered, tmp_path, capsys):
    tmp, uri = registered
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    labels = _inbox(inbox)
    argv = ["score", "--model", f"{MODEL}@champion", "--inbox", str(inbox), "--out", str(out),
            "--tracking-uri", uri]
    assert main(argv) == 0
    assert "scored 6" in capsys.readouterr().out

    results = pd.read_csv(out / "results.csv")
    assert sorted(results["image"]) == sorted(labels)
    assert set(results["model"]) == {MODEL} and set(results["model_version"]) == {1}
    assert {"score", "threshold", "verdict", "time"} <= set(results.columns)
    results["label"] = results["image"].map(labels)
    # A real check of the scores: every defect scores above every good image, and the
    # threshold calls more of the defective images defective than of the good ones.
    assert results.query("label == 1")["score"].min() > results.query("label == 0")["score"].max()
    called = results["score"] > results["threshold"]
    assert called[results["label"] == 1].mean() > called[results["label"] == 0].mean()
    assert (results["verdict"] == np.where(called, "defective", "good")).all()
    for stem in (Path(name).stem for name in labels):
        assert np.load(out / "maps" / f"{stem}.npy").shape == (64, 64)
        assert (out / "overlays" / f"{stem}.png").stat().st_size > 0

    # The inbox is empty of images: scored ones in done/, the corrupt one in quarantine/.
    assert sorted(p.name for p in (inbox / "done").iterdir()) == sorted(labels)
    assert sorted(p.name for p in (inbox / "quarantine").iterdir()) == [
        "broken.png", "broken.png.reason.txt"]
    reason = (inbox / "quarantine" / "broken.png.reason.txt").read_text()
    assert "broken.png" in reason and "cannot decode" in reason
    assert sorted(p.name for p in inbox.iterdir() if p.is_file()) == ["notes.txt"]

    # One MLflow run for the batch.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("defectflow-scoring")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["model"] == MODEL and run.data.params["model_version"] == "1"
    assert run.data.metrics["n_scored"] == 6 and run.data.metrics["n_quarantined"] == 1
    assert run.data.metrics["n_defective"] == int(called.sum())
    assert {"results.csv", "quarantined.csv", "overlays"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)}
    assert len(client.list_artifacts(run.info.run_id, "overlays")) == 6

    # A second call finds nothing new: nothing scored, moved or logged.
    before = (out / "results.csv").read_bytes()
    done_before = sorted(p.name for p in (inbox / "done").iterdir())
    done_good0 = (inbox / "done" / "good0.png").read_bytes()
    assert main(argv) == 0
    assert "scored 0" in capsys.readouterr().out
    assert (out / "results.csv").read_bytes() == before
    assert sorted(p.name for p in (inbox / "done").iterdir()) == done_before
    assert len(client.search_runs([experiment.experiment_id])) == 1

    # A new image with a name already in done/ is scored and kept beside the first one.
    cv2.imwrite(str(inbox / "good0.png"), textured_image(np.random.default_rng(7)))
    assert main(argv) == 0
    assert len(pd.read_csv(out / "results.csv")) == 7
    assert (inbox / "done" / "good0.png").read_bytes() == done_good0
    assert (inbox / "done" / "good0-1.png").is_file() and (out / "maps" / "good0-1.npy").is_file()


def test_unknown_model_is_one_line(registered, tmp_path, capsys):
    _, uri = registered
    (tmp_path / "inbox").mkdir()
    assert main(["score", "--model", "nope@champion", "--inbox", str(tmp_path / "inbox"),
                 "--out", str(tmp_path / "out"), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope@champion" in err[0] and "not found" in err[0]
