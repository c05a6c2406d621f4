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
from collections.abc import Callable, Mapping
from pathlib import Path

import pandas as pd

os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in CLI output

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.utils.time import get_current_time_millis  # noqa: E402

_BATCH = 100  # MLflow's log_batch limit on params per call


class Tracker:
    """Logs one pipeline invocation: a parent run and its (category, method) children."""

    def __init__(self, uri: str, experiment: str, artifact_root: str | Path | None = None):
        self.uri = uri
        # The registry lives in the same store. Set both process-wide: log_model registers
        # through MLflow's global registry URI, which an earlier load_model may have pointed
        # at another store.
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            # MLflow would fix an absolute <cwd>/mlruns location; keep artifacts beside the store.
            root = artifact_root or _default_artifact_root(uri)
            location = None if root is None else (Path(root) / experiment).resolve().as_uri()
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=location)
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


def _default_artifact_root(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts"
    if uri.startswith(("http://", "https://", "databricks")):
        return None  # a tracking server stores (or proxies) artifacts where it is configured to
    return Path("mlartifacts")  # a database URI (postgresql://...): beside the working folder


def record_pipeline(params, scanned, properties, results: list[dict], step_rows: list[dict],
                    seconds: float, fusions: list[dict] | None = None,
                    plots: list[dict] | None = None) -> dict:
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
    tracker = Tracker(params.tracking.resolved_uri(), experiment)
    steps = pd.DataFrame(step_rows)
    all_cached = bool(len(steps)) and bool((steps["status"] == "cached").all())
    base_tags = {"dataset": params.dataset_name, "backbone": params.features.backbone}
    parent = tracker.start_parent(f"{params.dataset_name}-pipeline", flatten(params),
                                  {**base_tags, "all_steps_cached": str(all_cached)})
    summary = {"experiment": experiment, "experiment_id": tracker.experiment_id,
               "parent_run_id": parent, "results": [], "all_steps_cached": all_cached}
    registrations: list[dict] = []  # detectors and fusions to register (params.registry)
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
            registrations.append({"result": result, "run_id": child, "metrics": metrics})
        for fused in fusions or []:
            folder = Path(fused["fusion"].path)
            summary_values = json.loads((folder / "summary.json").read_text())
            tags = {**base_tags, "category": fused["category"], "method": "segad_fusion",
                    "fusion_mode": summary_values.get("mode", "supervised")}
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
            registrations.append({"fusion": fused, "run_id": child, "metrics": summary_values})
            summary["results"].append({"category": fused["category"], "method": "segad_fusion",
                                       "run_id": child,
                                       "image_auroc": numeric.get("image_auroc_mean"),
                                       "image_auroc_std": numeric.get("image_auroc_std"),
                                       **{k: v for k, v in numeric.items()
                                          if k.endswith("image_score_auroc_mean")}})
        for plotted in plots or []:  # per category: curves, defect-type bars, t-SNE
            if any(Path(plotted["plots"].path).iterdir()):
                tracker.log_folder(parent, plotted["plots"].path,
                                   f"plots/{plotted['category']}")
        comparison = pd.DataFrame([{k: v for k, v in r.items() if k != "run_id"}
                                   for r in summary["results"]])
        tracker.log_table(parent, comparison, "comparison.csv", work)
        tracker.log_metrics(parent, {"total_seconds": seconds})
    if params.registry.enabled:  # model registry (off by default): see register_detectors
        summary["registered"] = register_detectors(
            tracker, params, [r for r in registrations if "result" in r])
        summary["registered"] += register_fusions(tracker, params, registrations)
    tracker.finish(parent)
    summary["total_seconds"] = seconds
    return summary


# -- model registry --------------------------------------------------------------------
class DetectorPyfunc(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc of one fitted detector: ``predict(images)`` -> score, verdict, map per image.

    ``images``: a pandas DataFrame with a ``path`` column, a list of paths, or a list of
    RGB uint8 arrays (H, W, 3). The result is a DataFrame with one row per image:
    ``image``, ``score``, ``threshold``, ``verdict`` (``defective`` / ``good``) and
    ``anomaly_map`` (float32 (H, W) at the image's resolution). All the work is
    ``serving.ImageScorer``'s; this class only adapts it to MLflow.
    """

    def load_context(self, context) -> None:
        from .serving import ImageScorer

        self.scorer = ImageScorer.from_folder(context.artifacts["model"])

    # A DataFrame hint is one MLflow infers no schema from: inputs pass through unchanged,
    # so lists of paths or arrays work too.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return self.scorer.score(model_input)


class FusionPyfunc(DetectorPyfunc):
    """MLflow pyfunc of one category's SegAD fusion: the same inputs and output columns as
    ``DetectorPyfunc``; ``score`` is the forest's margin, ``anomaly_map`` the mean of the
    detectors' maps each normalized by its held-out goods. The work is
    ``serving.FusionScorer``'s."""

    def load_context(self, context) -> None:
        from .serving import FusionScorer

        self.scorer = FusionScorer.from_folder(context.artifacts["model"])


def registered_model_name(prefix: str, dataset: str, category: str, method: str) -> str:
    """One registered model per (dataset, category, method): ``<prefix>-<dataset>-<category>-<method>``."""
    return "-".join(str(part).replace("/", "_") for part in (prefix, dataset, category, method))


def _pip_requirements() -> list[str]:
    # Explicit, so MLflow does not spend time inferring them from the environment.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return [f"defectflow=={version('defectflow')}"]
    except PackageNotFoundError:
        return ["defectflow"]


def register_detector(tracker: Tracker, run_id: str, name: str, model_folder: str | Path,
                      tags: Mapping[str, object], fusion: bool = False) -> str:
    """Log ``model_folder`` (``serving.write_model_folder``, or with ``fusion``
    ``serving.write_fusion_model_folder``) as a pyfunc LoggedModel of ``run_id`` and
    register it as a new version of ``name``; returns the version."""
    import logging

    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_log.level
    # Its warnings do not apply here: the model class is pickled by reference to this
    # installed module, and the inputs (paths, frames, arrays) have no fixed schema.
    pyfunc_log.setLevel(logging.ERROR)
    try:
        # log_model works on the active run; in a Prefect worker thread none is active, so
        # the child run is resumed for this call (MLflow keeps the active run per thread).
        with mlflow.start_run(run_id=run_id, experiment_id=tracker.experiment_id):
            info = mlflow.pyfunc.log_model(
                name="fusion" if fusion else "detector",
                python_model=FusionPyfunc() if fusion else DetectorPyfunc(),
                artifacts={"model": str(model_folder)}, pip_requirements=_pip_requirements(),
                registered_model_name=name, await_registration_for=60)
    finally:
        pyfunc_log.setLevel(level)
    version = str(info.registered_model_version)
    for key, value in tags.items():
        tracker.client.set_model_version_tag(name, version, key, str(value))
    return version


def promote_best(client: MlflowClient, name: str, alias: str, metric: str,
                 greater_is_better: bool = True) -> str | None:
    """Point ``alias`` at the version of ``name`` whose source run has the best ``metric``
    (ties: the newest version). Versions without the metric are not candidates."""
    candidates = []
    for found in client.search_model_versions(f"name = '{name}'"):
        try:
            value = client.get_run(found.run_id).data.metrics.get(metric)
        except mlflow.exceptions.MlflowException:
            continue  # its run was deleted
        if value is not None and value == value:
            candidates.append((value if greater_is_better else -value, int(found.version)))
    if not candidates:
        return None
    best = str(max(candidates)[1])
    client.set_registered_model_alias(name, alias, best)
    return best


def _version_with_tag(client: MlflowClient, name: str, key: str, value: str) -> str | None:
    """The newest version of registered model ``name`` tagged ``key=value``, or None."""
    try:
        found = client.search_model_versions(f"name = '{name}' and tag.{key} = '{value}'")
    except mlflow.exceptions.MlflowException:
        return None  # no such registered model yet
    return str(max(int(v.version) for v in found)) if found else None


def _register_once(tracker: Tracker, run_id: str, name: str, tags: dict,
                   write_folder: Callable[[Path], Path], fusion: bool = False) -> str:
    """The version of ``name`` tagged with ``tags["model_key"]``; when there is none, the
    model folder ``write_folder(folder)`` writes is registered from run ``run_id`` with
    ``tags``. Either way the run is tagged with the model's name and version."""
    import tempfile

    version = _version_with_tag(tracker.client, name, "model_key", tags["model_key"])
    if version is None:
        with tempfile.TemporaryDirectory(prefix="defectflow-model-") as tmp:
            folder = write_folder(Path(tmp) / "model")
            version = register_detector(tracker, run_id, name, folder, tags, fusion=fusion)
    tracker.set_tags(run_id, {"registered_model": name, "registered_version": version})
    return version


def register_detectors(tracker: Tracker, params, registrations: list[dict]) -> list[dict]:
    """Register each (category, method) detector of a pipeline run and promote the best
    version of each registered model to ``params.registry.alias``.

    ``registrations``: ``{"result": <pipeline result>, "run_id": child run, "metrics": ...}``.
    The SegAD fusions are registered by ``register_fusions``.
    """
    import dataclasses
    import json

    from .images import text_hash
    from .serving import config_from_pipeline, overlay_scale, write_model_folder

    registry = params.registry
    registered = []
    for item in registrations:
        result, metrics = item["result"], item["metrics"]
        threshold = metrics.get("threshold")
        if threshold is None or threshold != threshold:
            continue  # no held-out good images: no label-free threshold to decide with
        name = registered_model_name(registry.name_prefix, params.dataset_name,
                                     result["category"], result["method"])
        config = config_from_pipeline(params, result, threshold,
                                      overlay_scale(result["scores"].path))
        # The fitted detector's content key plus its scoring settings: a rerun from cache
        # finds its version instead of registering the same model again.
        model_key = text_hash(result["model"].key,
                              json.dumps(dataclasses.asdict(config), sort_keys=True))
        tags = {"dataset": params.dataset_name, "category": result["category"],
                "method": result["method"], "backbone": params.features.backbone,
                "threshold": threshold, "model_key": model_key,
                **{f"metric.{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}}
        version = _register_once(
            tracker, item["run_id"], name, tags,
            lambda folder: write_model_folder(folder, result["model"].path, config))
        registered.append({"name": name, "version": version, "category": result["category"],
                           "method": result["method"]})
    return _promote(tracker, registry, registered,
                    {r["name"]: registry.metric for r in registered})


def _promote(tracker: Tracker, registry, registered: list[dict],
             metric_of: Mapping[str, str | None]) -> list[dict]:
    """Point ``registry.alias`` of each model at its best version by its metric (warn when
    no version has it) and note the chosen version in ``registered``."""
    import warnings

    for name in sorted(metric_of):
        best = None
        if metric_of[name] is not None:
            best = promote_best(tracker.client, name, registry.alias, metric_of[name],
                                registry.greater_is_better)
        if best is None:
            warnings.warn(f"registry.metric {registry.metric!r} is in no version of {name!r}: "
                          f"alias {registry.alias!r} not set", stacklevel=3)
        for entry in registered:
            if entry["name"] == name:
                entry[registry.alias] = best
    return registered


def fusion_metric(metric: str, metrics: Mapping[str, object]) -> str | None:
    """The fusion's name for registry metric ``metric``: the fusion logs each per-seed metric
    as its mean and std over seeds, so ``image_auroc`` ranks by ``image_auroc_mean``; a name
    the fusion logs as is (e.g. ``image_auroc_mean``) is used unchanged. None: no such metric."""
    if metric in metrics:
        return metric
    return f"{metric}_mean" if f"{metric}_mean" in metrics else None


def register_fusions(tracker: Tracker, params, registrations: list[dict]) -> list[dict]:
    """Register each category's SegAD fusion as ``<prefix>-<dataset>-<category>-segad_fusion``
    (a ``FusionPyfunc``: every fused detector's model folder plus the fusion's forest,
    segment map and settings) and promote the best version by ``params.registry.metric``
    (through ``fusion_metric``: the fusion's metrics are means over seeds, while the served
    forest is the first seed's).

    ``registrations``: the detectors' entries (as ``register_detectors`` takes them) and the
    fusions' ``{"fusion": <pipeline fusion entry>, "run_id": child run, "metrics": summary}``.
    """
    import dataclasses
    import json

    from .images import text_hash
    from .fusion.deploy import FUSION_CONFIG_NAME, FusionConfig
    from .serving import config_from_pipeline, overlay_scale, write_fusion_model_folder

    registry = params.registry
    detectors = {(r["result"]["category"], r["result"]["method"]): r
                 for r in registrations if "result" in r}
    registered, metric_of = [], {}
    for item in (r for r in registrations if "fusion" in r):
        category, ref = item["fusion"]["category"], item["fusion"]["fusion"]
        config = FusionConfig.load(Path(ref.path) / FUSION_CONFIG_NAME)
        packed = {}
        for method in config.detectors:
            entry = detectors[(category, method)]
            threshold = entry["metrics"].get("threshold")
            scoring = config_from_pipeline(
                params, entry["result"], float("nan") if threshold is None else threshold,
                overlay_scale(entry["result"]["scores"].path))
            packed[method] = (entry["result"]["model"].path, scoring)
        name = registered_model_name(registry.name_prefix, params.dataset_name, category,
                                     "segad_fusion")
        # The fusion folder's content key plus every detector's scoring settings: a rerun
        # from cache finds its version instead of registering the same model again.
        model_key = text_hash(ref.key, *(json.dumps(dataclasses.asdict(packed[m][1]),
                                                    sort_keys=True) for m in config.detectors))
        tags = {"dataset": params.dataset_name, "category": category,
                "method": "segad_fusion", "backbone": params.features.backbone,
                "detectors": ",".join(config.detectors),
                "fusion_mode": item["metrics"].get("mode", "supervised"),
                "threshold": config.threshold, "threshold_rule": config.threshold_rule,
                "train_seed": config.train_seed, "model_key": model_key,
                **{f"metric.{k}": v for k, v in item["metrics"].items()
                   if isinstance(v, (int, float)) and v == v}}
        version = _register_once(
            tracker, item["run_id"], name, tags,
            lambda folder: write_fusion_model_folder(folder, ref.path, packed),
            fusion=True)
        registered.append({"name": name, "version": version, "category": category,
                           "method": "segad_fusion"})
        metric_of[name] = fusion_metric(registry.metric, item["metrics"])
    return _promote(tracker, registry, registered, metric_of)


def parse_model_ref(ref: str) -> tuple[str, str | None, str | None]:
    """``NAME@ALIAS`` or ``NAME/VERSION`` -> (name, alias, version)."""
    from .errors import DefectflowError

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
    from .errors import DefectflowError

    name, alias, version = parse_model_ref(ref)
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
                      tables: Mapping[str, pd.DataFrame], extra_params: Mapping[str, str]
                      ) -> str:
    """One MLflow run per scored inbox batch: the model and version as params, the counts as
    metrics and the batch's tables (``results.csv``, ``quarantined.csv``) as artifacts."""
    import tempfile

    tracker = Tracker(uri, experiment)
    run = tracker.client.create_run(tracker.experiment_id, run_name=f"score-{model['name']}",
                                    tags={"model": model["name"], "model_version": model["version"],
                                          **{k: model["tags"][k] for k in
                                             ("dataset", "category", "method")
                                             if k in model["tags"]}})
    run_id = run.info.run_id
    tracker.log_params(run_id, {"model": model["name"], "model_version": model["version"],
                                "model_alias": model.get("alias") or "", **extra_params})
    tracker.log_metrics(run_id, counts)
    with tempfile.TemporaryDirectory() as tmp:
        for name, table in tables.items():
            tracker.log_table(run_id, table, name, Path(tmp))
    tracker.finish(run_id)
    return run_id
