"""The defectflow pipeline: one Prefect flow, read top to bottom.

    1 scan + categorize → manifest, count table, image-property clusters
    2 patches           → patch table
    3 normalization     → per-category channel mean/std
    4 features          → content-addressed feature store (after CutPaste's training
                          when a feature source reads its encoder)
    5 train             → fitted detector per (category, method)
    6 score             → image scores + anomaly maps
    7 evaluate          → metrics, ROC, overlays
    7b fuse, plots      → SegAD fusion and comparison figures per category
    8 track             → MLflow parent run + child run per (category, method)

The Prefect tasks are thin wrappers of ``tasks.steps``; they cache on their
inputs (small descriptors whose keys hash the data's content) and on their
source, so a second identical run reuses every step.

Steps are submitted to the flow's task runner (``execution`` in params, see
``flows/runners.py``) and run as soon as their inputs are ready (``flows/steplog.py``):
the categories run side by side, and within a category its methods, each method's
train → score → evaluate in order; fusion and plots wait for all methods of their
category. Results keep the order declared here.
"""

from __future__ import annotations

import threading
import time

from prefect import flow, task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE
from prefect.task_runners import ThreadPoolTaskRunner

from ..tasks import steps
from ..tasks.cache import remove_stale_partials
from ..tasks.cores import shares_cores
from ..tasks.methods import CutPaste, source_hash
from ..tasks.methods.cutpaste_encoder import encoder_params
from ..tasks.params import PipelineParams
from ..tasks.patches import warn_if_squashed
from ..tasks.results import CategoryPlots, DetectorResult, FusionResult, PipelineSummary, scope
from .report import report
from .steplog import StepLog, timed

CACHED = dict(cache_policy=INPUTS + TASK_SOURCE, persist_result=True)

# Some detectors seed torch's process-wide random generator while they fit. Two fits in
# threads of one process would draw from it in turn and give different models each run;
# one fit at a time per process keeps results the same on every task runner.
_FIT_LOCK = threading.Lock()


# Timed inside the lock: a fit's wait for it counts as waiting, not as its run time.
_shared_train = shares_cores(timed(steps.train_step))


def _train_one_at_a_time(*args, **kwargs):
    with _FIT_LOCK:  # a fit waiting here does not count among the steps sharing the cores
        return _shared_train(*args, **kwargs)


# train_step's signature and source (TASK_SOURCE): the same cache keys as train_step itself.
_train_one_at_a_time.__wrapped__ = steps.train_step


# Each step's own run time is measured inside its worker (``timed``), apart from its wait.
scan = task(timed(steps.scan_step), name="scan", **CACHED)
categorize = task(timed(steps.categorize_step), name="categorize", **CACHED)
plan_patches = task(timed(steps.patches_step), name="patches", **CACHED)
normalize = task(timed(steps.normalization_step), name="normalization", **CACHED)
# The torch-heavy steps share the cores with whichever of them run at the same moment.
extract_features = task(shares_cores(timed(steps.features_step)), name="features",
                        cache_policy=(INPUTS - "progress") + TASK_SOURCE, persist_result=True)
train = task(_train_one_at_a_time, name="train", **CACHED)
score = task(shares_cores(timed(steps.score_step)), name="score", **CACHED)
evaluate = task(timed(steps.evaluate_step), name="evaluate", **CACHED)
fuse = task(shares_cores(timed(steps.fusion_step)), name="fusion", **CACHED)
make_plots = task(timed(steps.plots_step), name="plots", **CACHED)


# The default runner when the flow is called directly; the CLI picks it from params
# (flows/runners.py run_pipeline).
@flow(name="defectflow-pipeline", log_prints=False,
      task_runner=ThreadPoolTaskRunner(max_workers=2))
def pipeline(params: PipelineParams, verbose: bool = True,
             started: float | None = None) -> PipelineSummary:
    """Train, evaluate and track every (category, method) of one dataset. ``started``
    (epoch seconds, default now): when the invocation began, e.g. the CLI's start, so the
    logged total is the one it prints."""
    started = time.time() if started is None else started
    log = StepLog(verbose=verbose)
    p, cache = params, params.cache_dir
    dataset = p.dataset.model_dump(mode="json")
    denoise = (p.preprocessing.denoise.model_dump(mode="json")
               if p.preprocessing.denoise else None)

    remove_stale_partials(cache)  # half-written outputs of killed runs; running ones stay
    fingerprint = steps.source_fingerprint(p.dataset.layout, p.dataset.path)
    scanned = log.run("scan", scan, dataset, fingerprint, cache)
    warn_if_squashed(scanned.manifest, p.patches.size)
    properties = log.submit("categorize", categorize, scanned.manifest,
                            p.categorization.n_clusters, p.categorization.max_side,
                            p.dataset.seed, cache)
    patches = log.submit("patches", plan_patches, scanned.manifest, p.patches.size,
                         p.patches.stride, p.patches.min_mean_intensity, cache)

    results, fusions, plots = [], [], []
    cutpaste = encoder_params(p.features, p.methods)  # None: no source reads its encoder
    for category in sorted(scanned.manifest.table()["category"].unique()):
        stats = log.submit(f"normalization {scope(category)}", normalize, patches, scanned.manifest,
                           category, p.normalization, denoise)
        # The preprocessing travels with the statistics: every later step (and its cache key)
        # sees the same pixels.
        stats = log.then(stats, lambda stats: {**stats, "denoise": denoise})
        # A feature source reading CutPaste's encoder: CutPaste trains first, on pixels (no
        # store); the features step waits for it, and the CutPaste method reuses the model.
        encoder = None
        if cutpaste is not None:
            encoder = log.submit(f"train {scope(category, CutPaste.name)}", train, None,
                                 patches, scanned.manifest, category, CutPaste.name, cutpaste,
                                 p.features, stats, cache,
                                 method_source=source_hash(CutPaste.name))
        # No progress bars: the step log's status line shows what is running.
        store = log.submit(f"features {scope(category)}", extract_features, patches,
                           scanned.manifest, category, p.features, stats, cache,
                           progress=False, encoder=encoder)
        # Each method's parameter object, as the params validator built it.
        for method, method_params in p.methods.items():
            where = scope(category, method)
            if encoder is not None and method == CutPaste.name:
                model = encoder  # the same settings (``encoder_params``): trained once
            else:
                model = log.submit(f"train {where}", train, store, patches, scanned.manifest,
                                   category, method, method_params, p.features, stats, cache,
                                   method_source=source_hash(method))
            scores = log.submit(f"score {where}", score, model, store, patches, scanned.manifest,
                                category, method, p.features, stats, cache)
            evaluated = log.submit(f"evaluate {where}", evaluate, scores, scanned.manifest,
                                   category, p.evaluation.threshold_quantile,
                                   p.evaluation.overlays, cache, method=method)
            results.append(DetectorResult(category=category, method=method,
                                          method_params=method_params, normalization=stats,
                                          model=model, evaluation=evaluated, features=store,
                                          scores=scores))
        scored = {r.method: r.scores for r in results if r.category == category}
        fused = None
        if p.fusion.enabled and len(scored) >= 2 and p.patches.size is None:
            # One-class mode scores its synthetic defects with the same models and features.
            models = {r.method: r.model for r in results if r.category == category}
            fused = log.submit(f"fusion {scope(category)}", fuse, scored, scanned.manifest, category,
                               p.fusion, cache, models=models, features=p.features,
                               stats=stats)
            fusions.append(FusionResult(category=category, fusion=fused))
        if p.evaluation.plots:
            evaluated = {r.method: r.evaluation for r in results if r.category == category}
            plotted = log.submit(f"plots {scope(category)}", make_plots, evaluated, scanned.manifest,
                                 category, store, cache, fusion=fused,
                                 tsne_points=p.evaluation.tsne_points, seed=p.dataset.seed,
                                 scores=scored, overlays=p.evaluation.overlays)
            plots.append(CategoryPlots(category=category, plots=plotted))

    # Every step has finished here; MLflow is written once, from this process.
    properties, results, fusions, plots = log.gather((properties, results, fusions, plots))
    from ..tasks.tracking import record_pipeline

    track = task(record_pipeline, name="track", cache_policy=NO_CACHE)
    summary = track(p, scanned, properties, results, log.rows, started=started,
                    fusions=fusions, plots=plots)
    report(summary)  # the results table as a Prefect artifact and in the flow run's logs
    return summary
