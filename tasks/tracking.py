"""The one place that talks to MLflow.

Run layout: one experiment per dataset; one parent run per pipeline
invocation; one child run per (category, method) with tags ``dataset``,
``category``, ``method``, ``backbone``; params flattened from the resolved
YAML; artifacts under stable names (``manifest.parquet``, ``counts.csv``,
``roc.png``, ``overlays/``, ``model/``). The MLflow client is used with
explicit run ids (not the thread-local "active run"), so logging works from
any Prefect worker thread.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.utils.time import get_current_time_millis  # noqa: E402

_BATCH = 100  # MLflow's log_batch limit on params per call


class Tracker:
    """Logs one pipeline invocation: a parent run and its (category, method) children."""

    def __init__(self, uri: str, experiment: str, artifact_root: str | Path | None = None):
        self.uri = uri
        mlflow.set_tracking_uri(uri)
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            # MLflow would fix an absolute <cwd>/mlruns location; keep artifacts beside the store.
            root = Path(artifact_root or _default_artifact_root(uri)) / experiment
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=root.resolve().as_uri())
        else:
            self.experiment_id = found.experiment_id
        self.parent_id: str | None = None

    # -- runs --------------------------------------------------------------------
    def start_parent(self, run_name: str, params: Mapping[str, str],
                     tags: Mapping[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags))
        self.parent_id = run.info.run_id
        self.log_params(self.parent_id, params)
        return self.parent_id

    def start_child(self, run_name: str, params: Mapping[str, str],
                    tags: Mapping[str, str]) -> str:
        tags = {**tags, "mlflow.parentRunId": self.parent_id}
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

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


def _default_artifact_root(uri: str) -> Path:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts"
    return Path("mlartifacts")


def record_pipeline(params, scanned, properties, results: list[dict], step_rows: list[dict],
                    seconds: float, fusions: list[dict] | None = None) -> dict:
    """Log one pipeline invocation: parent run (data tables, step cache report), one child
    run per (category, method) with its metrics, plots, overlays and fitted detector.

    Cached steps log nothing themselves, so everything is logged here from the
    steps' outputs on disk: a rerun from cache records the same results in its
    own parent run, together with which steps it reused.
    """
    import json
    import tempfile

    from .params import flatten

    experiment = params.tracking.experiment or params.dataset_name
    tracker = Tracker(params.tracking.uri, experiment)
    steps = pd.DataFrame(step_rows)
    all_cached = bool(len(steps)) and bool((steps["status"] == "cached").all())
    base_tags = {"dataset": params.dataset_name, "backbone": params.features.backbone}
    parent = tracker.start_parent(f"{params.dataset_name}-pipeline", flatten(params),
                                  {**base_tags, "all_steps_cached": str(all_cached)})
    summary = {"experiment": experiment, "experiment_id": tracker.experiment_id,
               "parent_run_id": parent, "results": [], "all_steps_cached": all_cached}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        manifest = scanned.manifest.table()
        tracker.log_table(parent, manifest, "manifest.parquet", work)
        tracker.log_table(parent, scanned.counts.table(), "counts.csv", work)
        tracker.log_table(parent, properties.table(), "categories.csv", work)
        tracker.log_table(parent, steps, "steps.csv", work)
        if scanned.skipped:
            tracker.log_table(parent, pd.DataFrame(scanned.skipped, columns=["path", "reason"]),
                              "skipped_images.csv", work)
        tracker.log_metrics(parent, {"n_images": len(manifest),
                                     "n_skipped_images": len(scanned.skipped),
                                     "steps_cached": int((steps["status"] == "cached").sum()),
                                     "steps_total": len(steps)})
        for result in results:
            metrics = json.loads((Path(result["evaluation"].path) / "metrics.json").read_text())
            tags = {**base_tags, "category": result["category"], "method": result["method"]}
            child_params = {**flatten(params),
                            **{f"method.{k}": v for k, v in result["method_params"].items()},
                            "normalization.mean": result["normalization"]["mean"],
                            "normalization.std": result["normalization"]["std"],
                            "feature_store_key": result["features"].key}
            child = tracker.start_child(f"{result['category']}-{result['method']}",
                                        child_params, tags)
            tracker.log_metrics(child, metrics)
            history_path = Path(result["model"].path) / "history.json"
            if history_path.is_file():  # training curves: one metric per epoch, by step
                for name, values in json.loads(history_path.read_text()).items():
                    for step, value in enumerate(values):
                        tracker.log_metrics(child, {name: value}, step=step)
            evaluation = Path(result["evaluation"].path)
            for name in ("metrics.json", "roc.png", "scores.csv"):
                tracker.log_file(child, evaluation / name)
            if any((evaluation / "overlays").iterdir()):
                tracker.log_folder(child, evaluation / "overlays", "overlays")
            tracker.log_folder(child, result["model"].path, "model")
            tracker.finish(child)
            summary["results"].append({"category": result["category"],
                                       "method": result["method"], "run_id": child, **metrics})
        for fused in fusions or []:
            folder = Path(fused["fusion"].path)
            summary_values = json.loads((folder / "summary.json").read_text())
            tags = {**base_tags, "category": fused["category"], "method": "segad_fusion"}
            child = tracker.start_child(
                f"{fused['category']}-segad_fusion",
                {**flatten(params), "fusion.detectors": summary_values["detectors"]}, tags)
            per_seed = pd.read_csv(folder / "per_seed.csv")
            for row in per_seed.itertuples(index=False):  # one step per seed
                tracker.log_metrics(child, {"seed_image_auroc": row.image_auroc,
                                            "seed_image_aupr": row.image_aupr}, step=int(row.seed))
            numeric = {k: v for k, v in summary_values.items() if isinstance(v, (int, float))}
            tracker.log_metrics(child, numeric)
            for name in ("per_seed.csv", "scores.csv", "summary.json"):
                tracker.log_file(child, folder / name)
            tracker.finish(child)
            summary["results"].append({"category": fused["category"], "method": "segad_fusion",
                                       "run_id": child,
                                       "image_auroc": numeric.get("image_auroc_mean"),
                                       "image_auroc_std": numeric.get("image_auroc_std"),
                                       **{k: v for k, v in numeric.items()
                                          if k.endswith("image_score_auroc_mean")}})
        comparison = pd.DataFrame([{k: v for k, v in r.items() if k != "run_id"}
                                   for r in summary["results"]])
        tracker.log_table(parent, comparison, "comparison.csv", work)
        tracker.log_metrics(parent, {"total_seconds": seconds})
    tracker.finish(parent)
    summary["total_seconds"] = seconds
    return summary
