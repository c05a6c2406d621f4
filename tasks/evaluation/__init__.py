"""Evaluation of a detector's scores: metrics, the decision threshold, tables and plots.

- ``metrics``: threshold, image and pixel metrics, FPR at a TPR, per-defect-type AUROC,
  score tables (plain numpy in, plain dicts and DataFrames out);
- ``regions``: AUPRO (MVTec AD) and sPRO (MVTec LOCO AD), exact curves;
- ``localization``: those metrics on a score folder's maps against the manifest's masks
  (patches, whole images, stitched windows of large images);
- ``overlays``, ``plots``: PNG figures (matplotlib's Agg canvas, no pyplot);
- ``examples``: which test images are drawn, at which colour scale and map threshold, and
  the per-category grid of every method;
- ``tables``: comparison tables of methods and their terminal text.

The names below load their module on first use (PEP 562 ``__getattr__``): importing the
package costs nothing, so a step served from cache, or the CLI printing its summary table,
never imports scikit-learn or matplotlib.
"""

from __future__ import annotations

from importlib import import_module

_MODULE_OF = {
    **dict.fromkeys(("threshold_from_good", "image_metrics", "pixel_metrics", "fpr_at_tpr",
                     "per_defect_type_auroc", "per_defect_type_pixel_auroc", "score_table",
                     "image_scores", "labels_and_scores", "check_maps"), "metrics"),
    **dict.fromkeys(("aupro", "spro"), "regions"),
    **dict.fromkeys(("PIXEL_EVAL_SIDE", "AUPRO_FPR_LIMIT", "SPRO_FPR_LIMIT", "is_patch_mode",
                     "stitched_map", "stitched_pixel_metrics", "patch_pixel_metrics",
                     "spro_metrics", "mask_crop"), "localization"),
    **dict.fromkeys(("DISPLAY_MAX_SIDE", "save_overlay", "full_image_figure", "overlay_title",
                     "threshold_contours", "overlay_pixels", "overlay_figure", "outcome"),
                    "overlays"),
    **dict.fromkeys(("pick_overlay_examples", "overlay_picks", "save_overlays",
                     "save_full_image_figures", "DisplayLevels", "display_levels",
                     "overlay_name", "MethodMaps", "save_method_grid", "grid_picks"),
                    "examples"),
    **dict.fromkeys(("plot_roc", "plot_curves", "plot_defect_type_bars", "plot_tsne",
                     "save_figure"), "plots"),
    **dict.fromkeys(("METRIC_COLUMNS", "COLUMN_TITLES", "comparison_table", "format_table",
                     "THRESHOLD_COLUMNS", "THRESHOLD_NOTE", "markdown_table"), "tables"),
}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
