"""What an inspector sees in MLflow, checked on a real local ``mlflow server`` (SQLite,
127.0.0.1, a free port) after a pipeline run of two detectors and their fusion: the
training-view experiment kind, the runs-table view, the parent's comparison table, run
names, durations that cover the steps, and the fusion's number equal to the CLI's."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import make_folder_dataset, wait_for_http
from defectflow.cli import main


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on a SQLite store and a free port; its URI."""
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = open(tmp / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
         "--artifacts-destination", str(tmp / "artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{uri}/health", server, tmp / "server.log", timeout=180)
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_pipeline_on_an_mlflow_server_shows_the_comparison(mlflow_server, tmp_path, capsys):
    data = make_folder_dataset(tmp_path / "product", n_good=60, n_bad=20)
    params = tmp_path / "two-detectors.yaml"
    params.write_text(yaml.safe_dump({
        "dataset": {"layout": "folder", "path": str(data), "name": "generated",
                    "validation_fraction": 0.3},
        "features": {"input_size": 64},
        "methods": {"patchcore": {"coreset_ratio": 0.5}, "padim": {}},
        "fusion": {"seeds": 2, "n_defective": 8, "segments": 4},
        "evaluation": {"overlays": 2, "tsne_points": 0},
        "tracking": {"uri": mlflow_server},
        "cache_dir": str(tmp_path / "cache"),
    }))
    assert main(["run", str(params), "--quiet"]) == 0
    out = capsys.readouterr().out

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("generated")
    # The classic training view, and a stored runs-table view with the comparison columns.
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(experiment.tags["mlflow.sharedViewState.defectflow"])
    assert {"metrics.`image_auroc`", "metrics.`pixel_auroc`", "metrics.`recall`",
            "metrics.`false_alarm_rate`", "tags.`method`"} <= set(view["selectedColumns"])
    hint = next(line for line in out.splitlines() if line.startswith("MLflow UI:"))
    assert hint == (f"MLflow UI: {mlflow_server}/#/experiments/{experiment.experiment_id}"
                    "/runs?viewStateShareKey=defectflow&workflowType=machine_learning")
    # The view's filter finds the detector and fusion runs, not the parent.
    shown = client.search_runs([experiment.experiment_id], view["searchFilter"])
    assert sorted(r.info.run_name for r in shown) == [
        "product-padim", "product-patchcore", "product-segad_fusion"]

    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = {r.data.tags["method"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert set(children) == {"patchcore", "padim", "segad_fusion"}

    # The parent's description: the comparison as a markdown table, one line per method.
    note = parent.data.tags["mlflow.note.content"]
    assert "| category | method | image AUROC | pixel AUROC | recall@thr |" in note
    for method, child in children.items():
        auroc = child.data.metrics["image_auroc"]
        assert f"| product | {method} | {auroc:.4f} |" in note
    assert "F1-max picks its threshold with the test labels" in note

    # The fusion's image_auroc is the mean over seeds the CLI prints.
    fusion_line = next(line for line in out.splitlines()
                       if line.split()[:2] == ["product", "segad_fusion"])
    printed_mean = float(fusion_line.split()[2])
    fusion = children["segad_fusion"].data.metrics
    assert "image_auroc_std" in fusion and "seed_image_auroc" not in fusion
    assert round(fusion["image_auroc"], 4) == printed_mean

    # Real durations: the parent spans the whole run (its logged total, the printed one),
    # each child at least its own steps.
    steps = pd.read_csv(client.download_artifacts(parent.info.run_id, "steps.csv",
                                                  str(tmp_path)))
    duration = (parent.info.end_time - parent.info.start_time) / 1000
    assert duration >= steps["seconds"].max() > 0
    assert duration == pytest.approx(parent.data.metrics["total_seconds"], abs=0.01)
    printed_total = float(re.search(r"total time: ([\d.]+) s", out).group(1))
    assert printed_total == round(parent.data.metrics["total_seconds"], 1)
    for method, child in children.items():
        label = ("fusion [product]" if method == "segad_fusion"
                 else f"[product / {method}]")
        own = steps[steps["step"].str.endswith(label)
                    if method != "segad_fusion" else steps["step"] == label]
        child_seconds = (child.info.end_time - child.info.start_time) / 1000
        assert len(own) and child_seconds >= own["seconds"].max() - 0.01, method
        assert child.info.start_time >= parent.info.start_time
        assert child.info.end_time <= parent.info.end_time

    # Figures at the threshold reach the comparison, and the grid the parent run.
    patchcore = children["patchcore"].data.metrics
    assert patchcore["escape_rate"] == pytest.approx(1 - patchcore["recall"])
    assert 0 <= patchcore["false_alarm_rate"] <= 1
    assert "plots/product/overlays.png" in {
        a.path for a in client.list_artifacts(parent.info.run_id, "plots/product")}
    overlays = [Path(a.path).name for a in client.list_artifacts(
        children["patchcore"].info.run_id, "overlays")]
    assert overlays and all(re.fullmatch(r"(good_g|blob_b)\d{3}\.png", name) for name in overlays)

    # Prefect: the flow run is named and tagged, holds the results artifact and the lines.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId,
                                                FlowRunFilter, FlowRunFilterName,
                                                LogFilter, LogFilterFlowRunId)

    with get_client(sync_client=True) as prefect:
        flow_run = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=["generated-two-detectors"])))[0]
        assert {"generated", "patchcore", "padim", "segad_fusion"} <= set(flow_run.tags)
        artifacts = prefect.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))
        results = next(a for a in artifacts if a.key == "defectflow-results")
        assert parent.info.run_id in results.data and "| segad_fusion |" in results.data
        logs = prefect.read_logs(log_filter=LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
        messages = "\n".join(log.message for log in logs)
        assert parent.info.run_id in messages and "segad_fusion" in messages
