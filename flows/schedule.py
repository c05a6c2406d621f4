"""Scheduled training: the pipeline as a Prefect deployment (``defectflow serve``, prefect.yaml).

A deployment's parameters must be JSON: the deployed flow takes the params file's path
and ``--set`` overrides, and loads and validates them itself when a run starts, so each
scheduled run reads the file as it is then. Schedules need a Prefect server that runs its
scheduler service (``prefect server start``); the temporary server that ``defectflow run``
starts has none.

Imports are absolute: ``prefect deploy`` loads this file by its path
(``flows/schedule.py:scheduled_training``), outside the package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.types.entrypoint import EntrypointType

from defectflow.flows.preflight import preflight
from defectflow.flows.runners import run_pipeline
from defectflow.tasks.params import ParamsOrigin, load_params

DEFAULT_DEPLOYMENT = "scheduled"


@flow(name="defectflow-training", log_prints=True)
def scheduled_training(params_path: str, overrides: dict[str, Any] | None = None) -> dict:
    """Load the params file (plus overrides) and run the training pipeline once."""
    params = load_params(params_path, overrides or {})
    preflight(params, ParamsOrigin(params_path, dict(overrides or {})))
    summary = run_pipeline(params, verbose=False, params_path=params_path)
    for r in summary.results:  # log_prints: these lines land in the flow run's logs (UI)
        print(f"{r.category} / {r.method}: image AUROC {r.metrics.get('image_auroc')}")
    print(f"MLflow: experiment {summary.experiment!r}, run {summary.parent_run_id}")
    return {"experiment": summary.experiment, "parent_run_id": summary.parent_run_id,
            "all_steps_cached": summary.all_steps_cached,
            "results": [{"category": r.category, "method": r.method,
                         "image_auroc": r.metrics.get("image_auroc")} for r in summary.results]}


def serve(params_path: str | Path, overrides: dict[str, Any] | None = None, *,
          cron: str | None = None, interval: float | None = None,
          name: str = DEFAULT_DEPLOYMENT) -> None:
    """Serve ``scheduled_training`` on a cron or interval schedule; blocks until stopped.

    Runs of this deployment start one at a time (``limit=1``): two trainings at once on one
    machine would only slow each other down. On shutdown the schedule is paused.
    """
    scheduled_training.serve(
        name=name, cron=cron, interval=interval, limit=1,
        parameters={"params_path": str(Path(params_path).resolve()),
                    "overrides": dict(overrides or {})},
        # By module path: the runner imports defectflow.flows.schedule from the installed
        # package, wherever the serving process was started.
        entrypoint_type=EntrypointType.MODULE_PATH)
