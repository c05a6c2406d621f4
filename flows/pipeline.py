"""The defectflow pipeline: one Prefect flow, read top to bottom.

    1 scan + categorize → manifest, count table, image-property clusters
    2 patches           → patch table
    3 normalization     → per-category channel mean/std
    4 features          → content-addressed feature store
    5 train             → fitted detector per (category, method)
    6 score             → image scores + anomaly maps
    7 evaluate          → metrics, ROC, overlays
    8 track             → MLflow parent run + child run per (category, method)

The Prefect tasks are thin wrappers of ``tasks.steps``; they cache on their
inputs (small descriptors whose keys hash the data's content) and on their
source, so a second identical run reuses every step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prefect import flow, task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE

from ..tasks import steps
from ..tasks.params import PipelineParams, method_params

CACHED = dict(cache_policy=INPUTS + TASK_SOURCE, persist_result=True)

scan = task(steps.scan_step, name="scan", **CACHED)
categorize = task(steps.categorize_step, name="categorize", **CACHED)
plan_patches = task(steps.patches_step, name="patches", **CACHED)
normalize = task(steps.normalization_step, name="normalization", **CACHED)
extract_features = task(steps.features_step, name="features",
                        cache_policy=(INPUTS - "progress") + TASK_SOURCE, persist_result=True)
train = task(steps.train_step, name="train", **CACHED)
score = task(steps.score_step, name="score", **CACHED)
evaluate = task(steps.evaluate_step, name="evaluate", **CACHED)
fuse = task(steps.fusion_step, name="fusion", **CACHED)


@dataclass
class StepLog:
    """What each step did in this invocation: printed as it goes, and logged to MLflow."""

    rows: list[dict] = field(default_factory=list)
    verbose: bool = True

    def run(self, label: str, step, *args, **kwargs):
        start = time.perf_counter()
        state = step(*args, return_state=True, **kwargs)
        result = state.result()
        if hasattr(result, "exists") and not result.exists():
            # Prefect remembered a result whose files were deleted: compute it again.
            state = step.with_options(refresh_cache=True)(*args, return_state=True, **kwargs)
            result = state.result()
        status = "cached" if state.name == "Cached" else "ran"
        seconds = time.perf_counter() - start
        self.rows.append({"step": label, "status": status, "seconds": round(seconds, 2)})
        if self.verbose:
            print(f"  {label:<40} {status:>6}  {seconds:7.1f} s", flush=True)
        return result


@flow(name="defectflow-pipeline", log_prints=False)
def pipeline(params: PipelineParams, verbose: bool = True) -> dict:
    """Train, evaluate and track every (category, method) of one dataset."""
    started = time.perf_counter()
    log = StepLog(verbose=verbose)
    p, cache = params, params.cache_dir
    dataset = p.dataset.model_dump(mode="json")
    features = p.features.model_dump(mode="json")
    denoise = (p.preprocessing.denoise.model_dump(mode="json")
               if p.preprocessing.denoise else None)

    fingerprint = steps.source_fingerprint(p.dataset.layout, p.dataset.path)
    scanned = log.run("scan", scan, dataset, fingerprint, cache)
    properties = log.run("categorize", categorize, scanned.manifest, p.categorization.n_clusters,
                         p.categorization.max_side, p.dataset.seed, cache)
    patches = log.run("patches", plan_patches, scanned.manifest, p.patches.size,
                      p.patches.stride, p.patches.min_mean_intensity, cache)

    results, fusions = [], []
    for category in sorted(scanned.manifest.table()["category"].unique()):
        stats = log.run(f"normalization [{category}]", normalize, patches, scanned.manifest,
                        category, p.normalization, denoise)
        # The preprocessing travels with the statistics: every later step (and its cache key)
        # sees the same pixels.
        stats = {**stats, "denoise": denoise}
        store = log.run(f"features [{category}]", extract_features, patches, scanned.manifest,
                        category, features, stats, cache, progress=verbose)
        for method, options in p.methods.items():
            resolved = method_params(method, options, p.features.layers).__dict__
            resolved = {k: list(v) if isinstance(v, tuple) else v for k, v in resolved.items()}
            where = f"[{category} / {method}]"
            model = log.run(f"train {where}", train, store, patches, scanned.manifest, category,
                            method, resolved, p.features.input_size, stats, cache,
                            p.features.device)
            scores = log.run(f"score {where}", score, model, store, patches, scanned.manifest,
                             category, method, p.features.input_size, stats, cache,
                             p.features.device)
            evaluated = log.run(f"evaluate {where}", evaluate, scores, scanned.manifest,
                                category, p.evaluation.threshold_quantile,
                                p.evaluation.overlays, cache)
            results.append(dict(category=category, method=method, method_params=resolved,
                                normalization=stats, model=model, evaluation=evaluated,
                                features=store, scores=scores))
        scored = {r["method"]: r["scores"] for r in results if r["category"] == category}
        if p.fusion.enabled and len(scored) >= 2 and p.patches.size is None:
            fused = log.run(f"fusion [{category}]", fuse, scored, scanned.manifest, category,
                            p.fusion.model_dump(mode="json"), cache)
            fusions.append(dict(category=category, fusion=fused))

    from ..tasks.tracking import record_pipeline

    track = task(record_pipeline, name="track", cache_policy=NO_CACHE)
    return track(p, scanned, properties, results, log.rows, seconds=time.perf_counter() - started,
                 fusions=fusions)
