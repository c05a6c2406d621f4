"""The run layout of one pipeline invocation: a parent run (data tables, step cache report,
plots, comparison), one child run per (category, method) detector and one per category's
SegAD fusion, then the registry (``params.registry``) and the run's summary.

Cached steps log nothing themselves, so everything is logged here from the steps' outputs
on disk: a rerun from cache records the same results in its own parent run, together with
which steps it reused.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

import pandas as pd

from ..params import FUSION_METHOD, flatten
from ..results import (CategoryPlots, ComparisonRow, DetectorResult, FusionResult,
                       PipelineSummary, scope)
from . import views
from .client import Tracker
from .registry import TrackedRun, register_detectors, register_fusions


def record_pipeline(params, scanned, properties, results: list[DetectorResult],
                    step_rows: list[dict], started: float,
                    fusions: list[FusionResult] | None = None,
                    plots: list[CategoryPlots] | None = None) -> PipelineSummary:
    """Log one pipeline invocation: parent run (data tables, step cache report, comparison
    table as its description), one child run per (category, method) with its metrics,
    plots, overlays and fitted detector, one per category's fusion; register the models
    when ``params.registry.enabled``. ``started`` (epoch seconds) is when the invocation
    began: the parent run's start, and ``total_seconds`` runs from it to the parent's end.
    Each child run spans its own steps (``step_rows``' ``started``/``ended``)."""
    experiment = params.tracking.experiment or params.dataset_name
    tracker = Tracker(params.tracking.resolved_uri(), experiment)
    tracker.tag_experiment(views.EXPERIMENT_TAGS)
    steps = pd.DataFrame(step_rows)
    all_cached = bool(len(steps)) and bool((steps["status"] == "cached").all())
    base_tags = {"dataset": params.dataset_name, "backbone": params.features.label}
    # A failure anywhere below (a name MLflow rejects, a full disk) ends every run it
    # opened as FAILED instead of leaving them RUNNING.
    with tracker.ending_runs():
        parent = tracker.start_parent(f"{params.dataset_name}-pipeline", flatten(params),
                                      {**base_tags, "all_steps_cached": str(all_cached)},
                                      start_time=started)
        rows: list[ComparisonRow] = []
        tracked: list[TrackedRun] = []  # detectors and fusions to register (params.registry)
        ends: dict[str, float | None] = {}  # each child's end: registering resumes its run
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            _log_data(tracker, parent, scanned, properties, steps, work)
            for result in results:
                window = _window(step_rows, scope(result.category, result.method))
                tracked.append(_log_detector(tracker, params, base_tags, result, window))
                ends[tracked[-1].run_id] = window[1]
                rows.append(ComparisonRow(result.category, result.method, tracked[-1].run_id,
                                          tracked[-1].metrics))
            for fused in fusions or []:
                window = _window(step_rows, scope(fused.category), first_word="fusion")
                tracked.append(_log_fusion(tracker, params, base_tags, fused, window))
                ends[tracked[-1].run_id] = window[1]
                rows.append(_fusion_row(tracked[-1]))
            for plotted in plots or []:  # per category: curves, overlays grid, t-SNE, ...
                if any(Path(plotted.plots.path).iterdir()):
                    tracker.log_folder(parent, plotted.plots.path, f"plots/{plotted.category}")
            tracker.log_table(parent, pd.DataFrame([row.row() for row in rows]),
                              "comparison.csv", work)
        tracker.set_tags(parent, {"mlflow.note.content": views.description(
            rows, f"{params.dataset_name}: methods compared (parent run {parent})")})
        registered = []
        if params.registry.enabled:  # model registry (off by default): see register_detectors
            registered = (register_detectors(tracker, params, tracked)
                          + register_fusions(tracker, params, tracked))
            for run_id, end in ends.items():  # log_model resumed and ended the runs anew
                tracker.finish(run_id, end_time=end)
        ended = time.time()
        seconds = ended - started
        tracker.log_metrics(parent, {"total_seconds": seconds})
        tracker.finish(parent, end_time=ended)
    return PipelineSummary(experiment=experiment, experiment_id=tracker.experiment_id,
                           parent_run_id=parent, all_steps_cached=all_cached,
                           results=tuple(rows), total_seconds=seconds,
                           registered=tuple(registered),
                           ui_hint=views.ui_hint(tracker.uri, tracker.experiment_id))


def _window(step_rows: list[dict], suffix: str, first_word: str | None = None
            ) -> tuple[float | None, float | None]:
    """(start, end) in epoch seconds of the steps whose label ends with ``suffix`` (and
    starts with ``first_word``): from the first one's start to the last one's end."""
    chosen = [row for row in step_rows if row["step"].endswith(suffix)
              and (first_word is None or row["step"].split(" ")[0] == first_word)
              and row.get("started") is not None]
    if not chosen:
        return None, None
    return min(r["started"] for r in chosen), max(r["ended"] for r in chosen)


def _log_data(tracker: Tracker, parent: str, scanned, properties, steps: pd.DataFrame,
              work: Path) -> None:
    """The parent run's data tables and counts: manifest, counts, image-property clusters,
    steps (ran or cached) and skipped images."""
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


def _log_detector(tracker: Tracker, params, base_tags: dict, result: DetectorResult,
                  window: tuple[float | None, float | None]) -> TrackedRun:
    """One (category, method) child run: its settings, metrics (training curves by step),
    evaluation files, overlays and fitted detector."""
    evaluation = Path(result.evaluation.path)
    metrics = json.loads((evaluation / "metrics.json").read_text())
    tags = {**base_tags, "category": result.category, "method": result.method}
    child_params = {**flatten(params),
                    **{f"method.{k}": list(v) if isinstance(v, tuple) else v
                       for k, v in dataclasses.asdict(result.method_params).items()},
                    "normalization.mean": result.normalization["mean"],
                    "normalization.std": result.normalization["std"],
                    "feature_store_key": result.features.key}
    child = tracker.start_child(f"{result.category}-{result.method}", child_params, tags,
                                start_time=window[0])
    tracker.log_metrics(child, metrics)
    history_path = Path(result.model.path) / "history.json"
    if history_path.is_file():  # training curves: one metric per epoch, by step
        for name, values in json.loads(history_path.read_text()).items():
            for step, value in enumerate(values):
                tracker.log_metrics(child, {name: value}, step=step)
    for name in ("metrics.json", "roc.png", "scores.csv"):
        tracker.log_file(child, evaluation / name)
    if any((evaluation / "overlays").iterdir()):
        tracker.log_folder(child, evaluation / "overlays", "overlays")
    tracker.log_folder(child, result.model.path, "model")
    tracker.finish(child, end_time=window[1])
    return TrackedRun(result, child, metrics)


def _log_fusion(tracker: Tracker, params, base_tags: dict, fused: FusionResult,
                window: tuple[float | None, float | None]) -> TrackedRun:
    """One category's fusion child run: its figures (``fusion_metrics``: ``image_auroc`` is
    the mean over seeds, as everywhere else), tags saying which fusion each seed chose, and
    the fusion's tables (``per_seed.csv``: one row per seed, with its choice and reason)."""
    folder = Path(fused.fusion.path)
    summary = json.loads((folder / "summary.json").read_text())
    tags = {**base_tags, "category": fused.category, "method": FUSION_METHOD,
            "fusion_mode": summary.get("mode", "supervised"),
            "fusion_setting": summary.get("setting", "paper"),
            "fusion_choice": summary.get("choices", "")}
    child = tracker.start_child(f"{fused.category}-{FUSION_METHOD}",
                                {**flatten(params), "fusion.detectors": summary["detectors"]},
                                tags, start_time=window[0])
    metrics = fusion_metrics(summary)
    tracker.log_metrics(child, metrics)
    for name in ("per_seed.csv", "scores.csv", "summary.json"):
        tracker.log_file(child, folder / name)
    tracker.finish(child, end_time=window[1])
    return TrackedRun(fused, child, {**metrics, "mode": tags["fusion_mode"],
                                     "setting": tags["fusion_setting"],
                                     "choices": tags["fusion_choice"]})


def fusion_metrics(summary: dict) -> dict:
    """The fusion's metrics under the detectors' names: a per-seed metric ``x`` as ``x`` (its
    mean over seeds) and ``x_std``; each detector alone on the same images as
    ``<detector>.score_auroc`` (its mean); counts as they are. No per-seed metric: the
    seeds are rows of ``per_seed.csv``."""
    return {(key[:-len("_mean")] if key.endswith("_mean") else key): value
            for key, value in _numeric(summary).items()}


def _numeric(values: dict) -> dict:
    return {k: v for k, v in values.items() if isinstance(v, (int, float))}


def _fusion_row(tracked: TrackedRun) -> ComparisonRow:
    """A fusion in the comparison: its image AUROC (mean and std over seeds, the numbers its
    run logs) and each detector's own image score alone on the same images."""
    metrics = tracked.metrics
    return ComparisonRow(tracked.result.category, FUSION_METHOD, tracked.run_id, {
        "image_auroc": metrics.get("image_auroc"),
        "image_auroc_std": metrics.get("image_auroc_std"),
        "image_aupr": metrics.get("image_aupr"),
        "fusion": f"{metrics.get('mode')}, {metrics.get('setting')}: {metrics.get('choices')}",
        **{f"{k.split('.')[0]} alone": v for k, v in sorted(metrics.items())
           if k.endswith(".score_auroc")}})
