"""Using registered models: references (``NAME@ALIAS``, ``NAME/VERSION``) resolved to a
version, the version loaded as a pyfunc, and one run per scored inbox batch."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from ..errors import DefectflowError
from .client import Tracker
from .store import check_store


def parse_model_ref(ref: str) -> tuple[str, str | None, str | None]:
    """``NAME@ALIAS`` or ``NAME/VERSION`` -> (name, alias, version)."""
    if "@" in ref:
        name, alias = ref.rsplit("@", 1)
        if name and alias:
            return name, alias, None
    elif "/" in ref:
        name, version = ref.rsplit("/", 1)
        if name and version.isdigit():
            return name, None, version
    raise DefectflowError(f"model reference {ref!r} is not NAME@ALIAS or NAME/VERSION")


def resolve_model(ref: str, uri: str) -> dict:
    """The registered version a reference points at: name, version, run_id, uri, tags."""
    name, alias, version = parse_model_ref(ref)
    check_store(uri, create=False)  # a mistyped SQLite path must not become an empty store
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        found = (client.get_model_version_by_alias(name, alias) if alias
                 else client.get_model_version(name, version))
    except mlflow.exceptions.MlflowException as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DefectflowError(f"registered model {ref!r} not found ({message})", uri) from None
    return {"name": name, "alias": alias, "version": str(found.version),
            "run_id": found.run_id, "uri": f"models:/{name}/{found.version}",
            "tags": dict(found.tags)}


def load_model(ref: str | dict, uri: str):
    """(pyfunc model, resolved version) of ``NAME@ALIAS`` / ``NAME/VERSION``. The version is
    resolved once and loaded by number, so an alias moved meanwhile cannot mix versions."""
    resolved = resolve_model(ref, uri) if isinstance(ref, str) else ref
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # suppress_warnings skips MLflow's requirement check (~5 s of package scanning per
    # process): the model runs in the environment that logged it.
    return mlflow.pyfunc.load_model(resolved["uri"], suppress_warnings=True), resolved


def log_scoring_batch(uri: str, experiment: str, model: dict, counts: Mapping[str, float],
                      tables: Mapping[str, pd.DataFrame], extra_params: Mapping[str, str],
                      overlays: Sequence[str | Path] = ()) -> str:
    """One MLflow run per scored inbox batch: the model and version as params, the counts as
    metrics, the batch's tables (``results.csv``, ``quarantined.csv``) and its images'
    ``overlays`` (under ``overlays/``) as artifacts."""
    tracker = Tracker(uri, experiment)
    with tracker.ending_runs():  # a failure below marks the run FAILED, never RUNNING
        run_id = tracker.start_run(f"score-{model['name']}",
                                   {"model": model["name"], "model_version": model["version"],
                                    **{k: model["tags"][k] for k in
                                       ("dataset", "category", "method") if k in model["tags"]}})
        tracker.log_params(run_id, {"model": model["name"], "model_version": model["version"],
                                    "model_alias": model.get("alias") or "", **extra_params})
        tracker.log_metrics(run_id, counts)
        with tempfile.TemporaryDirectory() as tmp:
            for name, table in tables.items():
                tracker.log_table(run_id, table, name, Path(tmp))
        for overlay in overlays:
            tracker.log_file(run_id, overlay, "overlays")
        tracker.finish(run_id)
    return run_id
