"""Scoring flow: every new image of an inbox, with a registered model, one MLflow run per batch.

    1 resolve   NAME@ALIAS -> model version (the registry is asked once per batch)
    2 score     tasks.serving.inbox.score_inbox with the version's MLflow pyfunc, or with its
                ONNX / OpenVINO export (``format``; exported and logged first when missing)
    3 track     one run in the scoring experiment (only when something was processed)

``defectflow score`` runs it once; ``defectflow score --every SECONDS`` serves it as a
Prefect deployment on an interval schedule.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.types.entrypoint import EntrypointType

from ..tasks.serving import inbox as inbox_lib
from ..tasks.tracking import load_model, log_scoring_batch, resolve_model

SCORING_EXPERIMENT = "defectflow-scoring"
DEPLOYMENT_NAME = "defectflow-score"


@task(name="resolve model", cache_policy=NO_CACHE)
def resolve(model: str, tracking_uri: str) -> dict:
    return resolve_model(model, tracking_uri)


@task(name="score inbox", cache_policy=NO_CACHE)
def score(resolved: dict, inbox: str, out: str, tracking_uri: str,
          format: str | None = None) -> inbox_lib.InboxBatch:
    if format is not None:
        return _score_exported(resolved, inbox, out, tracking_uri, format)
    pyfunc, _ = load_model(resolved, tracking_uri)
    # The overlay colour scale saved with the model (the evaluation's), so overlays compare.
    scorer = pyfunc.unwrap_python_model().scorer
    return inbox_lib.score_inbox(inbox, out, pyfunc.predict, resolved["name"],
                                 resolved["version"], map_vmax=scorer.config.map_vmax)


def _score_exported(resolved: dict, inbox: str, out: str, tracking_uri: str,
                    fmt: str) -> inbox_lib.InboxBatch:
    """The inbox scored through the version's ONNX / OpenVINO export (same guarantees)."""
    # Loaded here: torch and the runtimes are paid for only by exported scoring.
    from ..tasks.serving.exported import ExportedScorer
    from ..tasks.tracking.exports import exported_model

    with tempfile.TemporaryDirectory(prefix="defectflow-exported-") as tmp:
        folder, _ = exported_model(resolved, tracking_uri, fmt, tmp)
        scorer = ExportedScorer(folder)
        return inbox_lib.score_inbox(inbox, out, scorer.score, resolved["name"],
                                     resolved["version"], map_vmax=scorer.config.map_vmax)


@task(name="track batch", cache_policy=NO_CACHE)
def track(resolved: dict, batch: inbox_lib.InboxBatch, inbox: str, out: str,
          tracking_uri: str, experiment: str, format: str | None = None) -> str:
    tables = {"results.csv": pd.DataFrame(batch.rows, columns=inbox_lib.RESULT_COLUMNS)}
    if batch.quarantined:
        tables["quarantined.csv"] = pd.DataFrame(batch.quarantined)
    if batch.duplicates:
        tables["duplicates.csv"] = pd.DataFrame(batch.duplicates)
    return log_scoring_batch(tracking_uri, experiment, resolved, batch.counts, tables,
                             {"inbox": inbox, "out": out, "format": format or "pyfunc"},
                             overlays=[Path(out) / row["overlay"] for row in batch.rows])


@flow(name="defectflow-score", log_prints=False)
def score_flow(model: str, inbox: str, out: str, tracking_uri: str = "sqlite:///mlflow.db",
               experiment: str = SCORING_EXPERIMENT, format: str | None = None) -> dict:
    """Score the inbox's new images with registered model ``model`` (NAME@ALIAS or NAME/N),
    through its pyfunc, or its ``format`` export (``onnx``, ``openvino``)."""
    resolved = resolve(model, tracking_uri)
    summary = {"model": resolved["name"], "model_version": resolved["version"],
               "n_scored": 0, "n_quarantined": 0, "n_defective": 0, "n_recovered": 0,
               "n_duplicates": 0, "run_id": None, "busy": False}
    if not inbox_lib.pending_images(inbox):
        return summary  # an idle inbox loads no model and logs no run
    batch = score(resolved, inbox, out, tracking_uri, format)
    summary.update(batch.counts, busy=batch.busy)
    if batch.rows or batch.quarantined or batch.duplicates:
        summary["run_id"] = track(resolved, batch, inbox, out, tracking_uri, experiment,
                                  format)
    return summary


def serve_every(seconds: float, **parameters) -> None:
    """Serve ``score_flow`` as a deployment that runs every ``seconds`` (blocks until stopped).
    Needs a Prefect server with its scheduler (``python3 -m defectflow.prefect_server``, or
    ``prefect server start`` with SQLAlchemy 2.0) and PREFECT_API_URL pointing at it."""
    # By module path: the runner imports defectflow.flows.score (its relative imports need
    # the package), not this file on its own.
    # limit=1: a batch slower than the interval delays the next run instead of starting a
    # pile of runs that would only find the inbox locked.
    score_flow.serve(name=DEPLOYMENT_NAME, interval=seconds, parameters=parameters,
                     entrypoint_type=EntrypointType.MODULE_PATH, limit=1)
