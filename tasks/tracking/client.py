"""The MLflow client of one experiment (``Tracker``): runs created and written with explicit
run ids (not the thread-local "active run"), so logging works from any Prefect worker thread;
and where an experiment's artifacts go when it is created."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.time import get_current_time_millis

_BATCH = 100  # MLflow's log_batch limit on params per call


class Tracker:
    """Logs one pipeline invocation: a parent run and its (category, method) children."""

    def __init__(self, uri: str, experiment: str, artifact_root: str | Path | None = None):
        self.uri = uri
        # The registry lives in the same store. Set both process-wide: log_model registers
        # through MLflow's global registry URI, which an earlier load_model may have pointed
        # at another store.
        # MLflow's INFO lines ("Creating initial MLflow database tables...") would land in
        # the middle of the step log.
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            # MLflow would fix an absolute <cwd>/mlruns location; keep artifacts beside the store.
            root = artifact_root or _default_artifact_root(uri)
            location = (None if root is None
                        else (Path(root) / artifact_folder(experiment)).resolve().as_uri())
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=location)
        else:
            self.experiment_id = found.experiment_id
        self.parent_id: str | None = None
        self.open_runs: list[str] = []  # started, not yet ended: end_open closes them

    def tag_experiment(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_experiment_tag(self.experiment_id, key, value)

    # -- runs --------------------------------------------------------------------
    # Runs are recorded after the work they describe: ``start_time`` / ``end_time`` (epoch
    # seconds) are when that work really ran; None means now.
    def start_parent(self, run_name: str, params: Mapping[str, str],
                     tags: Mapping[str, str], start_time: float | None = None) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags),
                                     start_time=_millis(start_time))
        self.parent_id = run.info.run_id
        self.open_runs.append(self.parent_id)
        self.log_params(self.parent_id, params)
        return self.parent_id

    def start_child(self, run_name: str, params: Mapping[str, str],
                    tags: Mapping[str, str], start_time: float | None = None) -> str:
        tags = {**tags, "mlflow.parentRunId": self.parent_id}
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags,
                                     start_time=_millis(start_time))
        self.open_runs.append(run.info.run_id)
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def start_run(self, run_name: str, tags: Mapping[str, str]) -> str:
        """A run of its own (no parent), ended by ``finish`` or ``end_open``."""
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags))
        self.open_runs.append(run.info.run_id)
        return run.info.run_id

    def finish(self, run_id: str, status: str = "FINISHED", end_time: float | None = None
               ) -> None:
        self.client.set_terminated(run_id, status=status, end_time=_millis(end_time))
        if run_id in self.open_runs:
            self.open_runs.remove(run_id)

    @contextlib.contextmanager
    def ending_runs(self) -> Iterator[Tracker]:
        """Every run started inside ends: the ones still open when an exception (or Ctrl+C)
        leaves the block are marked FAILED, children first, and the exception goes on."""
        try:
            yield self
        except BaseException:
            self.end_open("FAILED")
            raise

    def end_open(self, status: str = "FAILED") -> None:
        for run_id in reversed(list(self.open_runs)):
            try:
                self.finish(run_id, status)
            except Exception:  # noqa: BLE001  the store itself may be what failed: keep going
                logging.getLogger(__name__).warning("could not mark MLflow run %s %s",
                                                    run_id, status)

    # -- values --------------------------------------------------------------------
    def log_params(self, run_id: str, params: Mapping[str, object]) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, params=items[start:start + _BATCH])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        now = get_current_time_millis()
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if v is not None and v == v]  # NaN (undefined) metrics are left out
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[start:start + 1000])

    def set_tags(self, run_id: str, tags: Mapping[str, object]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    # -- files ---------------------------------------------------------------------
    def log_file(self, run_id: str, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path=folder)

    def log_folder(self, run_id: str, path: str | Path, folder: str) -> None:
        self.client.log_artifacts(run_id, str(path), artifact_path=folder)

    def log_table(self, run_id: str, table: pd.DataFrame, name: str, workdir: Path) -> None:
        """A DataFrame as an artifact named ``name`` (.csv or .parquet by its suffix)."""
        workdir.mkdir(parents=True, exist_ok=True)
        target = workdir / name
        if name.endswith(".parquet"):
            table.to_parquet(target, index=False)
        else:
            table.to_csv(target, index=False)
        self.log_file(run_id, target)


def artifact_folder(experiment: str) -> str:
    """The experiment's artifact folder name: the experiment name (from ``dataset.name``)
    with anything but letters, digits, ``.``, ``_`` and ``-`` replaced, and no leading dot, so
    a name like ``../evil`` stays inside the artifact root."""
    folder = re.sub(r"[^A-Za-z0-9._-]", "_", experiment).lstrip(".")
    return folder or "experiment"


def _millis(seconds: float | None) -> int | None:
    return None if seconds is None else int(round(seconds * 1000))


def _default_artifact_root(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts"
    if uri.startswith(("http://", "https://", "databricks")):
        return None  # a tracking server stores (or proxies) artifacts where it is configured to
    return Path("mlartifacts")  # a database URI (postgresql://...): beside the working folder
