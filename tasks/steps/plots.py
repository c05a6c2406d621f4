"""Step 8: a category's comparison figures (curves, AUROC per defect type, t-SNE)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .. import evaluation  # light: its names load their modules on first use
from ..params import FUSION_METHOD
from ..cache import Ref, cached_folder
from ..features import FeatureStoreRef
from ..scoring import SCORE_PIECE
from .common import step_key


def plots_step(evaluations: dict[str, Ref], manifest: Ref, category: str,
               store: FeatureStoreRef, cache_dir: str, fusion: Ref | None = None,
               tsne_points: int = 300, seed: int = 0, scores: dict[str, Ref] | None = None,
               overlays: int = 6) -> Ref:
    """The category's comparison figures, once all its methods (and the fusion) are done:

    - ``curves.png``: image ROC and PR curves of every method on one figure (the fusion
      with its first seed's evaluation scores), each detector's deployed threshold marked;
    - ``overlays.png``: the same ``overlays`` test images under every detector (rows =
      images, columns = methods), from the maps in ``scores``;
    - ``defect_types.png``: image AUROC per defect type and method (test images);
    - ``tsne.png``: t-SNE of per-image mean-pooled backbone features from the feature
      store (all layers concatenated), up to ``tsne_points`` test images (seeded sample),
      coloured by defect type ("good" for good images); none when ``tsne_points`` is 0.
    """
    key = step_key("plots", category, manifest.key, store.key,
                   *sorted(f"{m}:{r.key}" for m, r in evaluations.items()),
                   fusion.key if fusion is not None else "-", tsne_points, seed,
                   *sorted(f"{m}:{r.key}" for m, r in (scores or {}).items()), overlays)
    with cached_folder(cache_dir, "plots", key) as out:
        if out.missing:
            man = manifest.table()
            _plot_into(out.partial, evaluations, man.set_index("image_id"), category, store,
                       fusion, tsne_points, seed)
            if scores and overlays > 0:
                _method_grid(out.partial / "overlays.png", evaluations, scores, man, category,
                             overlays)
    return out.ref


def _method_grid(path: Path, evaluations: dict[str, Ref], scores: dict[str, Ref],
                 man: pd.DataFrame, category: str, count: int) -> None:
    """The same test images under every detector, each at its own threshold."""
    parts = {}
    for method in sorted(set(evaluations) & set(scores)):
        patch_scores = pd.read_parquet(Path(scores[method].path) / "scores.parquet")
        metrics = json.loads((Path(evaluations[method].path) / "metrics.json").read_text())
        levels = evaluation.DisplayLevels.read(evaluations[method].path)
        if levels is None:
            return
        parts[method] = evaluation.MethodMaps(
            test_patches=patch_scores[patch_scores["split"] == "test"],
            maps=np.load(Path(scores[method].path) / "anomaly_maps.npy", mmap_mode="r"),
            images=pd.read_csv(Path(evaluations[method].path) / "scores.csv"),
            threshold=float(metrics.get("threshold", float("nan"))), levels=levels)
    if parts:
        evaluation.save_method_grid(path, category, parts, man, count)


def _plot_into(folder: Path, evaluations: dict[str, Ref], man: pd.DataFrame, category: str,
               store: FeatureStoreRef, fusion: Ref | None, tsne_points: int, seed: int) -> None:
    tables = {m: pd.read_csv(Path(r.path) / "scores.csv") for m, r in sorted(evaluations.items())}
    legends, title = {}, f"{category}: image ROC and PR"
    if fusion is not None:
        fused = pd.read_csv(Path(fusion.path) / "scores.csv")
        seed = fused["seed"].min()
        fused = fused[fused["seed"] == seed]
        # Every curve on the fusion's first seed's evaluation images (the detectors scored
        # them all); the fusion's legend gives its figure: the mean ± std over seeds.
        tables = {m: t.set_index("image_id").loc[fused["image_id"]].reset_index()
                  for m, t in tables.items()}
        tables[FUSION_METHOD] = fused
        summary = json.loads((Path(fusion.path) / "summary.json").read_text())
        legends[FUSION_METHOD] = fusion_legend(summary, fused, seed)
        title += f", all on the {len(fused)} test images the fusion's seed {seed} evaluated"
    thresholds = {m: json.loads((Path(r.path) / "metrics.json").read_text()).get("threshold")
                  for m, r in evaluations.items()}
    evaluation.plot_curves({m: (t["label"].to_numpy(), t["score"].to_numpy())
                            for m, t in tables.items()},
                           folder / "curves.png", title=title, roc_legends=legends,
                           thresholds={m: t for m, t in thresholds.items() if t is not None})
    rows = []
    for method, table in tables.items():
        types = man.loc[table["image_id"], "defect_type"].to_numpy()
        if table["label"].nunique() == 2:
            for defect, auroc in evaluation.per_defect_type_auroc(
                    table["label"].to_numpy(), table["score"].to_numpy(), types).items():
                rows.append(dict(method=method, defect_type=defect, auroc=auroc))
    if rows:
        evaluation.plot_defect_type_bars(pd.DataFrame(rows), folder / "defect_types.png",
                                         title=f"{category}: image AUROC per defect type")
    embeddings, image_ids = image_embeddings(store, man, category, tsne_points, seed)
    if len(image_ids) >= 2:
        evaluation.plot_tsne(embeddings, man.loc[image_ids, "defect_type"].tolist(),
                             folder / "tsne.png", seed=seed,
                             title=f"{category}: t-SNE of backbone features "
                                   f"({len(image_ids)} test images)")


def fusion_legend(summary: dict, seed_scores: pd.DataFrame, seed: int) -> str:
    """The fusion's ROC legend: its mean ± std AUROC over seeds (the number its run logs),
    and the AUROC of the one seed whose curve is drawn."""
    from sklearn.metrics import roc_auc_score

    labels = seed_scores["label"].to_numpy()
    drawn = (f"{roc_auc_score(labels, seed_scores['score']):.3f}"
             if len(set(labels)) == 2 else "-")
    return (f"AUROC {summary['image_auroc_mean']:.3f} ± {summary['image_auroc_std']:.3f} "
            f"over seeds; curve: seed {seed}, {drawn}")


def image_embeddings(store: FeatureStoreRef, man: pd.DataFrame, category: str,
                     max_images: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Per-image embeddings from the feature store: each layer's feature map averaged over
    its positions, the layers concatenated, averaged over an image's patches. Up to
    ``max_images`` of the category's test images, a seeded sample when there are more,
    so the t-SNE stays cheap. Returns (embeddings (n, channels), image ids)."""
    # Row i of the table is row i of every layer's array.
    patches = pd.read_parquet(Path(store.directory) / "patches.parquet").reset_index(drop=True)
    tests = man[(man["category"] == category) & (man["split"] == "test")].index
    candidates = np.asarray(sorted(set(patches["image_id"]) & set(tests)), dtype=object)
    if max_images <= 0 or len(candidates) == 0:
        return np.zeros((0, 0)), []
    if len(candidates) > max_images:
        candidates = np.sort(np.random.default_rng(seed).choice(candidates, max_images,
                                                                replace=False))
    chosen = patches[patches["image_id"].isin(set(candidates))]
    positions = chosen.index.to_numpy()  # rows of the store, in increasing order
    arrays = [store.maps(layer) for layer in store.layers]
    pooled = []
    for start in range(0, len(positions), SCORE_PIECE):  # bounded memory for many patches
        part = positions[start:start + SCORE_PIECE]
        pooled.append(np.concatenate([np.asarray(a[part], dtype=np.float32).mean(axis=(2, 3))
                                      for a in arrays], axis=1))
    per_patch = pd.DataFrame(np.concatenate(pooled), index=chosen["image_id"].to_numpy())
    per_image = per_patch.groupby(level=0, sort=True).mean()
    return per_image.to_numpy(np.float64), per_image.index.tolist()
