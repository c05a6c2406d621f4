"""The pipeline's steps 1-4 for the benchmarks, without Prefect or MLflow.

Same cache as the pipeline, so features a run already extracted are found again.
The bench scripts import it as ``_pipeline`` (their folder is on ``sys.path`` when
run as ``python bench/<script>.py``).
"""

from __future__ import annotations

from defectflow.tasks.cache import Ref
from defectflow.tasks.features import FeatureStoreRef
from defectflow.tasks.methods import CutPaste
from defectflow.tasks.methods.cutpaste_encoder import encoder_params
from defectflow.tasks.steps import (
    ScanRefs,
    features_step,
    normalization_step,
    patches_step,
    scan_step,
    source_fingerprint,
    train_step,
)


def prepare_without_prefect(params, cache_dir: str | None = None) -> tuple[ScanRefs, Ref, str]:
    """Steps 1-3 for a benchmark: (scanned, patches, cache_dir)."""
    cache = cache_dir or params.cache_dir
    fingerprint = source_fingerprint(params.dataset.layout, params.dataset.path)
    scanned = scan_step(params.dataset.model_dump(mode="json"), fingerprint, cache)
    patches = patches_step(scanned.manifest, params.patches.size, params.patches.stride,
                           params.patches.min_mean_intensity, cache)
    return scanned, patches, cache


def category_features_without_prefect(params, scanned: ScanRefs, patches: Ref, category: str,
                                      cache_dir: str) -> tuple[dict, FeatureStoreRef]:
    """Steps 3-4 of one category for a benchmark: (normalization stats, feature store)."""
    denoise = (params.preprocessing.denoise.model_dump(mode="json")
               if params.preprocessing.denoise else None)
    stats = {**normalization_step(patches, scanned.manifest, category, params.normalization,
                                  denoise), "denoise": denoise}
    cutpaste, encoder = encoder_params(params.features, params.methods), None
    if cutpaste is not None:  # a source reads CutPaste's encoder: trained first, as in the flow
        encoder = train_step(None, patches, scanned.manifest, category, CutPaste.name, cutpaste,
                             params.features, stats, cache_dir)
    store = features_step(patches, scanned.manifest, category, params.features, stats,
                          cache_dir, progress=False, encoder=encoder)
    return stats, store
