"""The model registry: each tracked detector and SegAD fusion registered once per content key,
and an alias (``params.registry.alias``) on the best version of each registered model."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from ..fusion.deploy import FUSION_CONFIG_NAME, FusionConfig
from ..images import text_hash
from ..params import FUSION_METHOD
from ..results import DetectorResult, FusionResult, RegisteredModel
from ..serving.config import config_from_pipeline, overlay_scale
from ..serving.model_folder import write_fusion_model_folder, write_model_folder
from .client import Tracker
from .pyfunc import (SIGNATURE, DetectorPyfunc, FusionPyfunc, pip_requirements,
                     version_description)


@dataclasses.dataclass(frozen=True)
class TrackedRun:
    """A detector or fusion result, the child run that logged it and the metrics it logged."""

    result: DetectorResult | FusionResult
    run_id: str
    metrics: Mapping[str, object]


def registered_model_name(prefix: str, dataset: str, category: str, method: str) -> str:
    """One registered model per (dataset, category, method): ``<prefix>-<dataset>-<category>-<method>``.
    A ``/`` or a double quote in a part becomes ``_`` (``filter_literal`` needs one quote kind
    free); a single quote stays (``o'brien``)."""
    return "-".join(str(part).replace("/", "_").replace('"', "_")
                    for part in (prefix, dataset, category, method))


def filter_literal(value: str) -> str:
    """``value`` as a string in an MLflow search filter. MLflow's filter parser takes the text
    between the quotes as is (no escapes), so the value goes in the quote kind it lacks."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{value!r} holds both quote kinds: no MLflow filter can name it")


def register_detector(tracker: Tracker, run_id: str, name: str, model_folder: str | Path,
                      tags: Mapping[str, object], fusion: bool = False,
                      description: str | None = None) -> str:
    """Log ``model_folder`` (``serving.write_model_folder``, or with ``fusion``
    ``serving.write_fusion_model_folder``) as a pyfunc LoggedModel of ``run_id`` and
    register it as a new version of ``name``; returns the version."""
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_log.level
    # Its warnings do not apply here: the model class is pickled by reference to this
    # installed module, and the inputs (paths, frames, arrays) have no fixed schema.
    pyfunc_log.setLevel(logging.ERROR)
    try:
        # log_model works on the active run; in a Prefect worker thread none is active, so
        # the child run is resumed for this call (MLflow keeps the active run per thread).
        with mlflow.start_run(run_id=run_id, experiment_id=tracker.experiment_id), \
                warnings.catch_warnings():
            # The signature describes the outputs only (see pyfunc.SIGNATURE): no example.
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            info = mlflow.pyfunc.log_model(
                name="fusion" if fusion else "detector",
                python_model=FusionPyfunc() if fusion else DetectorPyfunc(),
                artifacts={"model": str(model_folder)}, pip_requirements=pip_requirements(),
                signature=SIGNATURE, registered_model_name=name, await_registration_for=60)
    finally:
        pyfunc_log.setLevel(level)
    version = str(info.registered_model_version)
    for key, value in tags.items():
        tracker.client.set_model_version_tag(name, version, key, str(value))
    if description:
        tracker.client.update_model_version(name, version, description=description)
    return version


def promote_best(client: MlflowClient, name: str, alias: str, metric: str,
                 greater_is_better: bool = True) -> str | None:
    """Point ``alias`` at the version of ``name`` whose source run has the best ``metric``
    (ties: the newest version). Versions without the metric are not candidates."""
    candidates = []
    for found in client.search_model_versions(f"name = {filter_literal(name)}"):
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
        found = client.search_model_versions(
            f"name = {filter_literal(name)} and tag.{key} = {filter_literal(value)}")
    except mlflow.exceptions.MlflowException:
        return None  # no such registered model yet
    return str(max(int(v.version) for v in found)) if found else None


def _register_once(tracker: Tracker, run_id: str, name: str, tags: dict,
                   write_folder: Callable[[Path], Path], fusion: bool = False,
                   description: str | None = None) -> str:
    """The version of ``name`` tagged with ``tags["model_key"]``; when there is none, the
    model folder ``write_folder(folder)`` writes is registered from run ``run_id`` with
    ``tags``. Either way the run is tagged with the model's name and version."""
    version = _version_with_tag(tracker.client, name, "model_key", tags["model_key"])
    if version is None:
        with tempfile.TemporaryDirectory(prefix="defectflow-model-") as tmp:
            folder = write_folder(Path(tmp) / "model")
            version = register_detector(tracker, run_id, name, folder, tags, fusion=fusion,
                                        description=description)
    tracker.set_tags(run_id, {"registered_model": name, "registered_version": version})
    return version


def _scoring_config(params, tracked: TrackedRun):
    """The scoring settings of a tracked detector, with the threshold its run logged (NaN:
    none, no held-out good images)."""
    threshold = tracked.metrics.get("threshold")
    return config_from_pipeline(params, tracked.result,
                                float("nan") if threshold is None else threshold,
                                overlay_scale(tracked.result.scores.path))


def register_detectors(tracker: Tracker, params, tracked: list[TrackedRun]
                       ) -> list[RegisteredModel]:
    """Register each (category, method) detector among ``tracked`` and promote the best
    version of each registered model to ``params.registry.alias``. The SegAD fusions are
    registered by ``register_fusions``."""
    registry = params.registry
    registered = []
    for item in tracked:
        if not isinstance(item.result, DetectorResult):
            continue
        result, metrics = item.result, item.metrics
        threshold = metrics.get("threshold")
        if threshold is None or threshold != threshold:
            continue  # no held-out good images: no label-free threshold to decide with
        name = registered_model_name(registry.name_prefix, params.dataset_name,
                                     result.category, result.method)
        config = _scoring_config(params, item)
        # The fitted detector's content key plus its scoring settings: a rerun from cache
        # finds its version instead of registering the same model again.
        model_key = text_hash(result.model.key, config.key_text())
        tags = {"dataset": params.dataset_name, "category": result.category,
                "method": result.method, "backbone": params.features.label,
                "threshold": threshold, "model_key": model_key,
                **{f"metric.{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}}
        what = (f"{result.method} detector of {params.dataset_name} / {result.category} "
                f"({params.features.label})")
        version = _register_once(
            tracker, item.run_id, name, tags,
            lambda folder: write_model_folder(folder, result.model.path, config),
            description=version_description(what, metrics, threshold))
        registered.append(RegisteredModel(name, version, result.category, result.method))
    return _promote(tracker, registry, registered,
                    {r.name: registry.metric for r in registered})


def _promote(tracker: Tracker, registry, registered: list[RegisteredModel],
             metric_of: Mapping[str, str | None]) -> list[RegisteredModel]:
    """Point ``registry.alias`` of each model at its best version by its metric (warn when
    no version has it); ``registered`` with the chosen version noted under the alias."""
    best_of = {}
    for name in sorted(metric_of):
        best = None
        if metric_of[name] is not None:
            best = promote_best(tracker.client, name, registry.alias, metric_of[name],
                                registry.greater_is_better)
        if best is None:
            warnings.warn(f"registry.metric {registry.metric!r} is in no version of {name!r}: "
                          f"alias {registry.alias!r} not set", stacklevel=3)
        best_of[name] = best
    return [dataclasses.replace(entry, aliases={**entry.aliases,
                                                registry.alias: best_of[entry.name]})
            for entry in registered]


def fusion_metric(metric: str, metrics: Mapping[str, object]) -> str | None:
    """The fusion's name for registry metric ``metric``: the fusion logs each per-seed metric
    under its own name as the mean over seeds (``image_auroc``), so that name is used as is;
    ``<metric>_mean`` is the fallback for other metrics dicts. None: no such metric."""
    if metric in metrics:
        return metric
    return f"{metric}_mean" if f"{metric}_mean" in metrics else None


def register_fusions(tracker: Tracker, params, tracked: list[TrackedRun]
                     ) -> list[RegisteredModel]:
    """Register each category's SegAD fusion as ``<prefix>-<dataset>-<category>-segad_fusion``
    (a ``FusionPyfunc``: every fused detector's model folder plus the fusion's forest,
    segment map and settings) and promote the best version by ``params.registry.metric``
    (through ``fusion_metric``: the fusion's metrics are means over seeds, while the served
    forest is the first seed's).

    ``tracked``: the detectors' runs (whose models the fusion packs) and the fusions' runs.
    """
    registry = params.registry
    detectors = {(t.result.category, t.result.method): t for t in tracked
                 if isinstance(t.result, DetectorResult)}
    registered, metric_of = [], {}
    for item in tracked:
        if not isinstance(item.result, FusionResult):
            continue
        category, ref = item.result.category, item.result.fusion
        config = FusionConfig.load(Path(ref.path) / FUSION_CONFIG_NAME)
        packed = {}
        for method in config.detectors:
            entry = detectors[(category, method)]
            packed[method] = (entry.result.model.path, _scoring_config(params, entry))
        name = registered_model_name(registry.name_prefix, params.dataset_name, category,
                                     FUSION_METHOD)
        # The fusion folder's content key plus every detector's scoring settings: a rerun
        # from cache finds its version instead of registering the same model again.
        model_key = text_hash(ref.key, *(packed[m][1].key_text() for m in config.detectors))
        tags = {"dataset": params.dataset_name, "category": category,
                "method": FUSION_METHOD, "backbone": params.features.label,
                "detectors": ",".join(config.detectors),
                "fusion_mode": item.metrics.get("mode", "supervised"),
                "threshold": config.threshold, "threshold_rule": config.threshold_rule,
                "train_seed": config.train_seed, "model_key": model_key,
                **{f"metric.{k}": v for k, v in item.metrics.items()
                   if isinstance(v, (int, float)) and v == v}}
        what = (f"SegAD fusion of {', '.join(config.detectors)} for {params.dataset_name} / "
                f"{category} (score: the forest's margin, first seed's forest)")
        version = _register_once(
            tracker, item.run_id, name, tags,
            lambda folder: write_fusion_model_folder(folder, ref.path, packed),
            fusion=True, description=version_description(
                what, {"image_auroc": item.metrics.get("image_auroc_mean")}, config.threshold))
        registered.append(RegisteredModel(name, version, category, FUSION_METHOD))
        metric_of[name] = fusion_metric(registry.metric, item.metrics)
    return _promote(tracker, registry, registered, metric_of)
