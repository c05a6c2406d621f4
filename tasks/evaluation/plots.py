"""Figures of image scores: ROC, ROC + PR of several methods, AUROC per defect type, t-SNE.

Plots draw on standalone matplotlib figures with the Agg canvas: no pyplot global
state, no display needed, safe in worker threads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from ..errors import DefectflowError
from .metrics import labels_and_scores


def operating_point(labels: np.ndarray, scores: np.ndarray, threshold: float
                    ) -> tuple[float, float, float]:
    """(false-alarm rate, recall, precision) of the verdict ``score >= threshold``; NaN where
    undefined (no good image, no defective one, nothing flagged)."""
    labels, scores = labels_and_scores(labels, scores)
    flagged = scores >= threshold

    def rate(hits, total) -> float:
        return float(hits / total) if total else float("nan")

    return (rate((flagged & ~labels).sum(), (~labels).sum()),
            rate((flagged & labels).sum(), labels.sum()),
            rate((flagged & labels).sum(), flagged.sum()))


def _mark(axes, x: float, y: float, color, label: str | None) -> None:
    if x == x and y == y:  # not NaN
        axes.plot([x], [y], marker="o", ms=9, mfc="none", mew=2, color=color, label=label)


def plot_roc(labels: np.ndarray, scores: np.ndarray, path: str | Path, title: str,
             threshold: float | None = None) -> Path:
    """Write the image-level ROC curve, with its AUROC in the legend, as a PNG at ``path``;
    with ``threshold``, the operating point of that threshold is marked (a circle)."""
    labels, scores = labels_and_scores(labels, scores)
    figure = Figure(figsize=(5, 5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if labels.any() and (~labels).any():
        fpr, tpr, _ = roc_curve(labels, scores)
        (line,) = axes.plot(fpr, tpr, lw=2, label=f"AUROC = {roc_auc_score(labels, scores):.3f}")
        if threshold is not None and threshold == threshold:
            false_alarms, recall, _ = operating_point(labels, scores, threshold)
            _mark(axes, false_alarms, recall, line.get_color(),
                  f"threshold {threshold:.4g}: recall {recall:.3f}, "
                  f"false alarms {false_alarms:.3f}")
    else:
        axes.plot([], [], " ", label="AUROC undefined: one class only")
    axes.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="chance")
    axes.set(
        xlim=(0, 1), ylim=(0, 1.01), title=title,
        xlabel="false positive rate", ylabel="true positive rate",
    )
    axes.set_aspect("equal")
    axes.legend(loc="lower right")
    figure.tight_layout()
    return save_figure(figure, path)


def plot_curves(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str,
    thresholds: dict[str, float] | None = None,
    roc_legends: Mapping[str, str] | None = None,
) -> Path:
    """Write ROC (left) and precision-recall (right) curves of several methods as one PNG.

    ``curves`` maps a method name to its image ``(labels, scores)``; the legends
    carry each method's AUROC and average precision, or for a name in
    ``roc_legends`` that text in the ROC legend (e.g. a mean over seeds). A method
    whose labels hold one class only is listed without a curve. ``thresholds``
    (method -> its deployed threshold) marks each method's operating point on both
    curves (circles).
    """
    thresholds = thresholds or {}
    if not curves:
        raise DefectflowError("no curves to plot", path)
    figure = Figure(figsize=(11, 5), dpi=100)
    FigureCanvasAgg(figure)
    roc_axes, pr_axes = figure.subplots(1, 2)
    defect_rates = set()
    for name, (labels, scores) in curves.items():
        labels, scores = labels_and_scores(labels, scores)
        if not (labels.any() and (~labels).any()):
            roc_axes.plot([], [], " ", label=f"{name}: one class only")
            continue
        fpr, tpr, _ = roc_curve(labels, scores)
        legend = (roc_legends or {}).get(name, f"AUROC {roc_auc_score(labels, scores):.3f}")
        (line,) = roc_axes.plot(fpr, tpr, lw=2, label=f"{name} ({legend})")
        precision, recall, _ = precision_recall_curve(labels, scores)
        # Steps, as average precision integrates it (no optimistic interpolation).
        pr_axes.plot(
            recall, precision, lw=2, color=line.get_color(), drawstyle="steps-post",
            label=f"{name} (AP {average_precision_score(labels, scores):.3f})",
        )
        if name in thresholds and thresholds[name] == thresholds[name]:
            false_alarms, recall, precision_at = operating_point(labels, scores,
                                                                 thresholds[name])
            _mark(roc_axes, false_alarms, recall, line.get_color(), None)
            _mark(pr_axes, recall, precision_at, line.get_color(), None)
        defect_rates.add(float(labels.mean()))
    roc_axes.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="chance")
    if len(defect_rates) == 1:  # the chance level of PR is the defect rate, if all share it
        pr_axes.axhline(defect_rates.pop(), ls="--", color="grey", lw=1, label="chance")
    roc_axes.set(
        xlim=(0, 1), ylim=(0, 1.01), title="ROC",
        xlabel="false positive rate", ylabel="true positive rate",
    )
    pr_axes.set(
        xlim=(0, 1), ylim=(0, 1.01), title="precision-recall",
        xlabel="recall", ylabel="precision",
    )
    if thresholds:
        roc_axes.plot([], [], "o", mfc="none", mew=2, color="grey",
                      label="o: at the deployed threshold")
    roc_axes.legend(loc="lower right", fontsize="small")
    pr_axes.legend(loc="lower left", fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_defect_type_bars(
    table: pd.DataFrame, path: str | Path, title: str = "image AUROC per defect type"
) -> Path:
    """Write grouped bars of AUROC per defect type (groups) and method (bars) as a PNG.

    ``table`` has the columns ``method``, ``defect_type`` and ``auroc``, one row
    per pair (see :func:`per_defect_type_auroc`). Methods and types keep their
    order of first appearance.
    """
    missing = {"method", "defect_type", "auroc"} - set(table.columns)
    if missing:
        raise DefectflowError(f"defect-type table lacks the columns {sorted(missing)}", path)
    if table.empty:
        raise DefectflowError("defect-type table is empty", path)
    if table.duplicated(["method", "defect_type"]).any():
        raise DefectflowError("defect-type table has a (method, defect_type) pair twice", path)
    methods = list(dict.fromkeys(table["method"]))
    types = list(dict.fromkeys(table["defect_type"]))
    grid = table.pivot(index="defect_type", columns="method", values="auroc")
    grid = grid.reindex(index=types, columns=methods)

    width_inches = max(7.0, 3.0 + 0.35 * len(types) * (len(methods) + 1))
    figure = Figure(figsize=(width_inches, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = np.arange(len(types))
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        axes.bar(
            positions - 0.4 + width * (j + 0.5), grid[method].to_numpy(dtype=float), width,
            label=str(method),
        )
    axes.axhline(0.5, ls="--", color="grey", lw=1, label="chance")
    axes.set_xticks(positions, [str(t) for t in types], rotation=30, ha="right")
    axes.set(ylim=(0, 1.05), ylabel="AUROC", title=title)
    # Outside the axes: inside, it would cover the bars it explains.
    axes.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    return save_figure(figure, path)


def plot_tsne(
    embeddings: np.ndarray,
    labels: Sequence,
    path: str | Path,
    seed: int = 0,
    title: str = "t-SNE of embeddings",
) -> Path:
    """Write a 2-D t-SNE scatter of ``embeddings`` (n x d), coloured by label, as a PNG.

    Shows whether defective images separate from good ones (or categories from
    each other) in a detector's feature space. Perplexity is min(30, (n - 1) / 3):
    the usual 30, lowered for small n, where t-SNE needs it below n and a
    neighbourhood of about a third of the points still shows structure.
    ``seed`` makes the layout reproducible. Meant for up to a few thousand points.
    """
    points = np.asarray(embeddings, dtype=np.float64)
    if points.ndim != 2 or points.shape[0] < 2:
        raise DefectflowError(
            f"t-SNE needs an n x d array with n >= 2, got shape {points.shape}", path
        )
    if not np.isfinite(points).all():
        raise DefectflowError("embeddings contain NaN or infinite values", path)
    labels = np.asarray(list(labels), dtype=object)
    if labels.size != points.shape[0]:
        raise DefectflowError(f"{labels.size} labels but {points.shape[0]} embeddings", path)

    # Imported here: t-SNE's import costs ~0.7 s, which the other plots do not need.
    from sklearn.manifold import TSNE

    n, d = points.shape
    layout = TSNE(
        n_components=2,
        perplexity=min(30.0, max(1.0, (n - 1) / 3)),
        init="pca" if min(n, d) >= 2 else "random",  # PCA start needs 2 dimensions
        # Exact gradients are faster than Barnes-Hut below ~1000 points (whose
        # tree overhead dominates there), and O(n^2) memory is small at that size.
        method="exact" if n <= 1000 else "barnes_hut",
        random_state=seed,
    ).fit_transform(points)

    figure = Figure(figsize=(6, 6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    classes = sorted(set(labels.tolist()), key=str)
    palette = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    for k, value in enumerate(classes):
        chosen = labels == value
        axes.scatter(
            layout[chosen, 0], layout[chosen, 1], s=14, color=palette(k % palette.N),
            label=f"{value} ({int(chosen.sum())})",
        )
    axes.set(title=title, xticks=[], yticks=[])
    axes.legend(fontsize="small", loc="best")
    figure.tight_layout()
    return save_figure(figure, path)


def save_figure(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
