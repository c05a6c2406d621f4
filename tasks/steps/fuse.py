"""Step 7b: SegAD fusion of a category's detectors, and the synthetic defects of its
one-class mode (made, then scored exactly as real images are)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from .. import fusion as segad
from ..cache import Ref, cached_folder
from ..errors import DefectflowError
from ..feature_settings import FeatureSettings
from ..fusion.deploy import write_deployable_fusion
from ..images import file_hash, read_image, text_hash
from ..methods import METHODS
from ..params import FusionParams
from ..patches import plan_patches
from ..scoring import new_images_batch
from .common import step_key
from .detect import score_into


def fusion_step(method_scores: dict[str, Ref], manifest: Ref, category: str,
                fusion: FusionParams, cache_dir: str, models: dict[str, Ref] | None = None,
                features: FeatureSettings | None = None, stats: dict | None = None) -> Ref:
    """SegAD: per-segment statistics of every detector's anomaly maps and their own image
    scores, fused per seed over ``fusion.seeds`` seeds (``fusion.setting``: ``paper``, SegAD's
    boosted forest; ``auto``, the stacker or the forest as cross-validation on the training
    split chooses). Writes per_seed.csv (with each seed's choice), scores.csv and
    summary.json, and the fusion to serve (the first seed's) with segments.npy, fusion.json
    and, for a forest, forest.json.

    ``fusion.mode``:

    - ``"supervised"``: trained on the held-out good images plus ``n_defective`` labelled
      defective test images per seed, evaluated on the rest of the test set;
    - ``"one_class"`` (SegAD appendix A.2): no real defect is used. Per seed, synthetic
      defects are pasted on the held-out good images (``synthetic_step``), scored by every
      detector (``models``) through the same features and score path as real images
      (``features``: the flow's feature params, ``stats``: normalization and denoising),
      and the fusion is trained on held-out good + synthetic images and evaluated on the
      whole test set.

    The images are those every detector scored (a supervised detector leaves out the defects
    it trained on). Only whole-image runs are fused: with patches the maps are per window.
    """
    parts = [category, json.dumps(fusion.model_dump(mode="json"), sort_keys=True),
             *sorted(f"{m}:{r.key}" for m, r in method_scores.items())]
    if fusion.mode == "one_class":
        if models is None or features is None or stats is None \
                or set(models) != set(method_scores):
            raise DefectflowError("one-class fusion needs every detector's model, the feature "
                                  f"parameters and the normalization (category {category!r})")
        parts += [*sorted(f"{m}:{r.key}" for m, r in models.items()),
                  json.dumps(feature_settings(features, stats), sort_keys=True)]
    # "deployable": the folder also holds the forest to serve (write_deployable_fusion);
    # a new key so that folders cached before it existed are not taken for complete ones.
    key = step_key("fusion", "deployable", *parts)
    with cached_folder(cache_dir, "fusions", key) as out:
        if out.missing:
            _fuse_into(out.partial, method_scores, manifest, category, fusion, cache_dir,
                       models, features, stats)
    return out.ref


def _fuse_into(folder: Path, method_scores: dict[str, Ref], manifest: Ref, category: str,
               fusion: FusionParams, cache_dir: str, models: dict[str, Ref] | None,
               features: FeatureSettings | None, stats: dict | None) -> None:
    """Fit and evaluate the fusion over its seeds; write its tables and forest to ``folder``."""
    mode = fusion.mode
    detectors = sorted(method_scores)
    man = manifest.table().set_index("image_id")
    tables = {m: pd.read_parquet(Path(method_scores[m].path) / "scores.parquet")
              for m in detectors}
    if any(t["image_id"].duplicated().any() for t in tables.values()):
        raise DefectflowError(f"fusion needs whole images, not patches (category {category!r})")
    common = sorted(set.intersection(*(set(t["image_id"]) for t in tables.values())))
    maps = [maps_of(method_scores[m], tables[m], common) for m in detectors]
    size = maps[0].shape[-1]
    segments = fusion_segments(fusion, man, category, size)
    # SegAD's segment features, then each detector's own image score ("<d>.score").
    features_table = _with_own_scores(segad.feature_frame(maps, segments, common, detectors),
                                      tables, common, detectors)
    labels = man.loc[common, "label"].astype(int)
    seeds = range(fusion.seed, fusion.seed + fusion.seeds)
    n_synthetic = 0
    if mode == "one_class":
        val_ids = [i for i in common if man.loc[i, "split"] == "val"]
        synthetic = synthetic_step(manifest, val_ids, category, segments, list(seeds),
                                   fusion.synthetic_per_image, cache_dir)
        synthetic_table = pd.read_parquet(Path(synthetic.path) / "manifest.parquet")
        synthetic_ids = synthetic_table["image_id"].tolist()
        synthetic_refs = [synthetic_scores_step(models[m], m, synthetic, category, features,
                                                stats, cache_dir) for m in detectors]
        synthetic_tables = {m: pd.read_parquet(Path(ref.path) / "scores.parquet")
                            for m, ref in zip(detectors, synthetic_refs)}
        synthetic_maps = [maps_of(ref, synthetic_tables[m], synthetic_ids)
                          for m, ref in zip(detectors, synthetic_refs)]
        features_table = pd.concat([features_table, _with_own_scores(segad.feature_frame(
            synthetic_maps, segments, synthetic_ids, detectors), synthetic_tables,
            synthetic_ids, detectors)])
        labels = pd.concat([labels, pd.Series(1, index=pd.Index(synthetic_ids), dtype=int)])
        by_seed = synthetic_table.groupby("seed")["image_id"].apply(list)
        splits = [segad.one_class_split(common, man.loc[common, "split"].tolist(),
                                        by_seed.loc[seed], seed=seed) for seed in seeds]
        n_synthetic = len(synthetic_ids)
    else:
        splits = segad.supervised_splits(common, labels.tolist(),
                                         man.loc[common, "split"].tolist(),
                                         n_defective=fusion.n_defective, seeds=seeds)
    segad.assert_no_leakage(splits)
    own = segad.score_columns(detectors)
    choice = segad.ChoiceSettings(
        detector_columns=tuple(zip(detectors, own)),
        # paper: the forest on SegAD's features only; auto: with the detectors' own scores
        forest_columns=tuple(c for c in features_table.columns
                             if fusion.setting == "auto" or c not in own),
        folds=fusion.cv_folds)
    result = segad.run_protocol(features_table, labels, splits, kind=fusion.classifier,
                                baselines=own, n_jobs=fusion.n_jobs, setting=fusion.setting,
                                choice=choice)
    result.per_seed.to_csv(folder / "per_seed.csv", index=False)
    result.scores.to_csv(folder / "scores.csv", index=False)
    summary = {k_: float(v) for k_, v in result.summary.items()}
    summary.update(n_images=len(common), n_segments=segad.count_segments(segments),
                   detectors=",".join(detectors), mode=mode, setting=fusion.setting,
                   choices=choice_counts(result.per_seed["choice"]))
    if mode == "one_class":
        summary["n_synthetic"] = n_synthetic
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    # The one fusion the registry serves: the first seed's, as the protocol fitted it.
    write_deployable_fusion(folder, result.fitted[0], features_table, labels,
                            splits[0].train_ids, splits[0].seed, maps, common, segments,
                            detectors, category, kind=fusion.classifier)


def choice_counts(choices: pd.Series) -> str:
    """Which fusion the seeds chose, most frequent first: "forest x7, stacker x3"."""
    return ", ".join(f"{name} x{count}" for name, count in choices.value_counts().items())


def _with_own_scores(frame: pd.DataFrame, tables: dict[str, pd.DataFrame], ids: list[str],
                     detectors: list[str]) -> pd.DataFrame:
    """``frame`` (indexed by image id) plus each detector's own image score of ``ids``."""
    own = segad.score_frame([tables[m].set_index("image_id").loc[ids, "score"].to_numpy()
                             for m in detectors], ids, detectors)
    return pd.concat([frame, own], axis=1)


def maps_of(scores: Ref, table: pd.DataFrame, image_ids: list[str]) -> np.ndarray:
    """The anomaly maps of ``image_ids`` (whole images) from a score folder, in that order."""
    table = table.reset_index(drop=True)
    rows = table.reset_index().set_index("image_id").loc[image_ids, "index"].to_numpy()
    stored = np.load(Path(scores.path) / "anomaly_maps.npy", mmap_mode="r")
    # Read in file order (memory-mapped), then put back in the requested order.
    return np.asarray(stored[np.sort(rows)])[np.argsort(np.argsort(rows))]


def fusion_segments(fusion: FusionParams, man: pd.DataFrame, category: str,
                    size: int) -> np.ndarray:
    """The category's (size, size) segment map: a grid, or superpixels of one good image."""
    k = fusion.segments
    if fusion.segmentation == "superpixels":
        # Computed once on a reference good image of the category, applied to all (SegAD).
        reference = man[(man["category"] == category) & (man["split"] == "train")].index.min()
        return segad.superpixel_segments(read_image(man.loc[reference, "path"]), k, size,
                                         seed=fusion.seed)
    return segad.grid_segments(size, k)


def feature_settings(features: FeatureSettings, stats: dict) -> dict:
    """What decides a detector's input pixels and features (the device and batch size don't)."""
    return {"backbone": features.backbone, "layers": list(features.layers),
            "input_size": features.input_size,
            "mean": [round(float(v), 6) for v in stats["mean"]],
            "std": [round(float(v), 6) for v in stats["std"]],
            "denoise": stats.get("denoise"),
            **({"sources": [dataclasses.asdict(s) for s in features.sources],
                "combine": features.combine, "channels": features.channels}
               if features.combined else {})}


def synthetic_step(manifest: Ref, val_ids: list[str], category: str, segments: np.ndarray,
                   seeds: list[int], per_image: int, cache_dir: str) -> Ref:
    """Synthetic defective images (SegAD appendix A.2) made from held-out good images.

    For every seed, ``per_image`` defects per image in ``val_ids``, each drawn by
    ``fusion.synthesize_defects`` with a generator seeded by (seed, copy, image content
    hash): the same image and seed always give the same defect. Written once as PNG
    files under ``<cache_dir>/synthetic/<key>/`` (key = the images' content hashes, the
    segment map, the seeds and the count) with ``manifest.parquet``: a manifest (same
    columns as the real one; split "synthetic", label 1, defect type
    ``synthetic_<kind>``, ``mask_path`` the defect's footprint) plus ``seed`` and
    ``source_image_id``.
    """
    if not val_ids:
        raise DefectflowError(f"one-class fusion needs held-out good ('val') images in category "
                              f"{category!r} (set dataset.validation_fraction > 0)")
    man = manifest.table().set_index("image_id")
    hashes = man.loc[val_ids, "content_hash"].tolist()
    segments = np.ascontiguousarray(segments, dtype=np.int32)
    key = step_key("synthetic", category, *sorted(hashes),
                   text_hash(segments.shape, segments.tobytes()), tuple(seeds), per_image)
    with cached_folder(cache_dir, "synthetic", key) as out:
        if out.missing:
            _synthesize_into(out.partial, out.path, man, val_ids, hashes, category, segments,
                             seeds, per_image)
    return out.ref


def _synthesize_into(folder: Path, final: Path, man: pd.DataFrame, val_ids: list[str],
                     hashes: list[str], category: str, segments: np.ndarray, seeds: list[int],
                     per_image: int) -> None:
    """Write the synthetic images, their masks and manifest into ``folder``; the manifest's
    paths point where they will be, under ``final``."""
    (folder / "images").mkdir()
    (folder / "masks").mkdir()
    rows = []
    for image_id, content_hash in zip(val_ids, hashes):
        info = man.loc[image_id]
        image = read_image(info["path"])
        for seed in seeds:
            for copy in range(per_image):
                rng = np.random.default_rng([int(seed), copy, int(content_hash[:15], 16)])
                kind = segad.DEFECT_KINDS[int(rng.integers(len(segad.DEFECT_KINDS)))]
                defective, mask = segad.synthesize_defects(image, segments, rng, kind=kind)
                name = f"{len(rows):06d}.png"
                path, mask_path = final / "images" / name, final / "masks" / name
                cv2.imwrite(str(folder / "images" / name),
                            cv2.cvtColor(defective, cv2.COLOR_RGB2BGR))
                cv2.imwrite(str(folder / "masks" / name), mask.astype(np.uint8) * 255)
                rows.append(dict(image_id=f"synthetic/{seed}/{copy}/{image_id}", path=str(path),
                                 split="synthetic", label=1, defect_type=f"synthetic_{kind}",
                                 mask_path=str(mask_path), category=category,
                                 width=int(info["width"]), height=int(info["height"]),
                                 channels=3,
                                 content_hash=file_hash(folder / "images" / name),
                                 annotation_path=None, seed=int(seed),
                                 source_image_id=image_id))
    pd.DataFrame(rows).to_parquet(folder / "manifest.parquet", index=False)


def synthetic_scores_step(model: Ref, method: str, synthetic: Ref, category: str,
                          features: FeatureSettings, stats: dict, cache_dir: str) -> Ref:
    """One detector's scores and anomaly maps of the synthetic images, exactly as real images
    are scored: the same whole-image patches, backbone features into the content-addressed
    feature store (same backbone, layers, input size, normalization, denoising), the
    detector loaded from its saved model and ``score_into``. Cached under ``scores/``."""
    table = pd.read_parquet(Path(synthetic.path) / "manifest.parquet")
    rows = plan_patches(table, None, None, use_annotations=False)
    # A detector that reads pixels only needs no feature store (CutPaste trained before the
    # features, for a source reading its encoder, has no feature transform to make one).
    batch = new_images_batch(table, rows, features, stats, cache_dir,
                             with_features=METHODS[method].reads_features,
                             model_dir=model.path)
    key = step_key("score-synthetic", model.key,
                   batch.store.key if batch.store is not None else "pixels", category)
    with cached_folder(cache_dir, "scores", key) as out:
        if out.missing:
            score_into(METHODS[method].load(model.path), batch, out.partial)
    return out.ref
