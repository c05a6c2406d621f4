"""Step 7: evaluate one detector's scores (metrics, ROC, overlays, score table)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .. import evaluation  # light: its names load their modules on first use
from ..cache import Ref, cached_folder
from ..errors import DefectflowError
from .common import step_key


def evaluate_step(scores: Ref, manifest: Ref, category: str, threshold_quantile: float,
                  overlays: int, cache_dir: str) -> Ref:
    """Metrics (image level, pixel level where masks exist), ROC plot, overlays, score table."""
    # The manifest key covers the masks and the saturation thresholds (defects config).
    key = step_key("evaluate", scores.key, manifest.key, threshold_quantile, overlays)
    with cached_folder(cache_dir, "evaluations", key) as out:
        if out.missing:
            _evaluate_into(out.partial, scores, manifest.table(), category, threshold_quantile,
                           overlays)
    return out.ref


def _evaluate_into(folder: Path, scores: Ref, man: pd.DataFrame, category: str,
                   threshold_quantile: float, overlays: int) -> None:
    patch_scores = pd.read_parquet(Path(scores.path) / "scores.parquet")
    maps = np.load(Path(scores.path) / "anomaly_maps.npy", mmap_mode="r")
    images = evaluation.image_scores(patch_scores, man)
    val = images[images["split"] == "val"]
    test = images[images["split"] == "test"]
    if test.empty:
        raise DefectflowError(f"category {category!r} has no test images")
    threshold = (evaluation.threshold_from_good(val["score"].to_numpy(), threshold_quantile)
                 if len(val) else float("nan"))
    labels, values = test["label"].to_numpy(), test["score"].to_numpy()
    metrics = evaluation.image_metrics(labels, values, threshold)
    metrics["threshold"] = threshold
    metrics["fpr_at_95_tpr"] = evaluation.fpr_at_tpr(labels, values, 0.95)
    if len(set(test["defect_type"])) > 2:  # good plus two or more defect types
        for defect, auroc in evaluation.per_defect_type_auroc(
                labels, values, test["defect_type"].to_numpy()).items():
            metrics[f"image_auroc.{defect}"] = auroc
    metrics.update(n_test_images=len(test), n_test_defective=int(labels.sum()),
                   n_val_images=len(val))

    test_patches = patch_scores[patch_scores["split"] == "test"]
    if evaluation.is_patch_mode(patch_scores, man):
        # Large images: metrics over patches (thesis Tables 6.1-6.4), pixel metrics and
        # figures on the stitched full-resolution maps.
        val_patches = patch_scores[patch_scores["split"] == "val"]
        patch_threshold = (evaluation.threshold_from_good(val_patches["score"].to_numpy(),
                                                          threshold_quantile)
                           if len(val_patches) else float("nan"))
        per_patch = evaluation.image_metrics(test_patches["label"].to_numpy(),
                                             test_patches["score"].to_numpy(), patch_threshold)
        metrics.update({"patch_" + k.removeprefix("image_"): v for k, v in per_patch.items()})
        metrics.update(patch_threshold=patch_threshold, n_test_patches=len(test_patches))
        metrics.update(evaluation.stitched_pixel_metrics(test_patches, maps, man))
        evaluation.save_full_image_figures(folder / "overlays", test, test_patches, maps, man,
                                           overlays)
    else:
        metrics.update(evaluation.patch_pixel_metrics(test_patches, maps, man))
        metrics.update(evaluation.spro_metrics(test_patches, maps, man))
        evaluation.save_overlays(folder / "overlays", test, test_patches, maps, man, overlays)

    (folder / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
    evaluation.plot_roc(labels, values, folder / "roc.png", title=f"{category}: image ROC")
    evaluation.score_table(test["image_id"].tolist(), labels, values, threshold).to_csv(
        folder / "scores.csv", index=False)
