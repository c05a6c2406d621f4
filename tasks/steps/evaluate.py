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
                  overlays: int, cache_dir: str, method: str = "") -> Ref:
    """Metrics (image level, pixel level where masks exist), ROC plot, overlays (titled with
    ``method``), score table, and the maps' display levels (``display.json``)."""
    # The manifest key covers the masks and the saturation thresholds (defects config).
    key = step_key("evaluate", scores.key, manifest.key, threshold_quantile, overlays, method)
    with cached_folder(cache_dir, "evaluations", key) as out:
        if out.missing:
            _evaluate_into(out.partial, scores, manifest.table(), category, threshold_quantile,
                           overlays, method)
    return out.ref


def _evaluate_into(folder: Path, scores: Ref, man: pd.DataFrame, category: str,
                   threshold_quantile: float, overlays: int, method: str) -> None:
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
    val_patches = patch_scores[patch_scores["split"] == "val"]
    levels = evaluation.display_levels(val_patches.index.to_numpy(),
                                       test_patches.index.to_numpy(), maps, threshold_quantile)
    levels.write(folder)
    drawn = dict(method=method, threshold=threshold, levels=levels)
    if evaluation.is_patch_mode(patch_scores, man):
        # Large images: metrics over patches (thesis Tables 6.1-6.4), pixel metrics and
        # figures on the stitched full-resolution maps.
        patch_threshold = (evaluation.threshold_from_good(val_patches["score"].to_numpy(),
                                                          threshold_quantile)
                           if len(val_patches) else float("nan"))
        metrics.update(patch_threshold=patch_threshold, n_test_patches=len(test_patches))
        if _defects_have_masks(test, man):
            # A patch's label comes from the mask. Without masks every patch of a defective
            # image would count as defective: those numbers would mislead, so none is logged.
            per_patch = evaluation.image_metrics(test_patches["label"].to_numpy(),
                                                 test_patches["score"].to_numpy(),
                                                 patch_threshold)
            metrics.update({"patch_" + k.removeprefix("image_"): v
                            for k, v in per_patch.items()})
        metrics.update(evaluation.stitched_pixel_metrics(test_patches, maps, man))
        evaluation.save_full_image_figures(folder / "overlays", test, test_patches, maps, man,
                                           overlays, **drawn)
    else:
        metrics.update(evaluation.patch_pixel_metrics(test_patches, maps, man))
        metrics.update(evaluation.spro_metrics(test_patches, maps, man))
        evaluation.save_overlays(folder / "overlays", test, test_patches, maps, man, overlays,
                                 **drawn)

    (folder / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
    evaluation.plot_roc(labels, values, folder / "roc.png", title=f"{category}: image ROC",
                        threshold=threshold)
    evaluation.score_table(test["image_id"].tolist(), labels, values, threshold).to_csv(
        folder / "scores.csv", index=False)


def _defects_have_masks(test: pd.DataFrame, man: pd.DataFrame) -> bool:
    """Every defective test image has a ground-truth mask."""
    defective = test.loc[test["label"] == 1, "image_id"]
    masks = man.set_index("image_id").loc[defective, "mask_path"]
    return bool(len(masks)) and bool(masks.map(lambda p: isinstance(p, str)).all())
