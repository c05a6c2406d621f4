"""The pipeline's steps on by-reference data: what ``flows/pipeline.py`` wraps as Prefect tasks.

Each step reads its inputs from small descriptors, calls the plain functions
of the other modules, writes its output once under a content-addressed key
(the hash of its inputs' keys and the parameters that matter) and returns a
small descriptor. Calling a step again with the same inputs finds the output
and returns at once, with or without Prefect's cache in front of it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DefectflowError
from .features import FeatureStoreRef, extract_features, resolve_device
from .images import read_image, read_mask, text_hash
from .methods import METHODS, PatchSet
from .normalization import normalization_stats
from .patches import plan_patches

# datasets and evaluation (scikit-learn, matplotlib) are imported inside the steps that use
# them: a rerun whose steps all come from cache then never pays for those imports.
STEP_VERSION = "1"
SCORE_PIECE = 512  # patches scored per call: bounds the anomaly maps held in memory  # bump when a step's output format or meaning changes


@dataclass(frozen=True)
class Ref:
    """A content-addressed output on disk: a file or folder, and the key it was made under."""

    path: str
    key: str

    def exists(self) -> bool:
        return Path(self.path).exists()

    def table(self) -> pd.DataFrame:
        return pd.read_parquet(self.path)


@dataclass(frozen=True)
class ScanResult:
    manifest: Ref
    counts: Ref
    skipped: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def exists(self) -> bool:
        return self.manifest.exists() and self.counts.exists()


def _out(cache_dir: str | Path, kind: str, key: str, suffix: str = "") -> Path:
    path = Path(cache_dir) / kind / f"{key}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _write_table(table: pd.DataFrame, path: Path) -> None:
    partial = path.with_name(path.name + f".partial-{os.getpid()}")
    table.to_parquet(partial, index=False)
    partial.replace(path)


def _finish_folder(partial: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(partial, ignore_errors=True)
    else:
        partial.rename(final)


# -- 1. scan + categorize ---------------------------------------------------------
def source_fingerprint(layout: str, path: str | None) -> str:
    """Cheap stat-based fingerprint of a data source: changes when any file changes.

    It is the cache key of the scan (which hashes every file's content); the
    later steps are keyed on those content hashes.
    """
    if layout == "elpv":
        import elpv_dataset

        root = Path(elpv_dataset.__file__).parent
    else:
        if path is None:
            raise DefectflowError(f"dataset.path is required for layout {layout!r}")
        root = Path(path)
        if not root.exists():
            raise DefectflowError("dataset path not found", root)
    entries = []
    for item in sorted(root.rglob("*")):
        if item.is_file():
            stat = item.stat()
            entries.append(f"{item.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}")
    return text_hash(layout, str(root.resolve()), *entries)


def scan_step(dataset: dict, fingerprint: str, cache_dir: str) -> ScanResult:
    """Manifest (with validation hold-out) and count table of a data source."""
    from . import datasets

    # The dataset's display name does not change the manifest: keep it out of the key.
    relevant = {k: v for k, v in dataset.items() if k != "name"}
    key = text_hash("scan", STEP_VERSION, fingerprint, json.dumps(relevant, sort_keys=True))
    manifest_path = _out(cache_dir, "manifests", key, ".parquet")
    counts_path = _out(cache_dir, "tables", f"counts-{key}", ".parquet")
    skipped_path = _out(cache_dir, "tables", f"skipped-{key}", ".json")
    if manifest_path.exists() and counts_path.exists() and skipped_path.exists():
        skipped = tuple(tuple(x) for x in json.loads(skipped_path.read_text()))
        return ScanResult(Ref(str(manifest_path), key), Ref(str(counts_path), key), skipped)
    result = datasets.scan_dataset(
        dataset["layout"], dataset.get("path"), category=dataset.get("category"),
        train_fraction=dataset["train_fraction"], seed=dataset["seed"],
        materialize_dir=Path(cache_dir) / "datasets")
    manifest = result.manifest
    if dataset.get("categories"):
        wanted = set(dataset["categories"])
        unknown = wanted - set(manifest["category"])
        if unknown:
            raise DefectflowError(f"categories {sorted(unknown)} not in the dataset "
                                  f"(found {sorted(set(manifest['category']))})",
                                  dataset.get("path") or dataset["layout"])
        manifest = manifest[manifest["category"].isin(wanted)].reset_index(drop=True)
    manifest = datasets.holdout_validation(manifest, dataset["validation_fraction"],
                                           dataset["seed"])
    _write_table(manifest, manifest_path)
    _write_table(datasets.count_table(manifest), counts_path)
    skipped_path.write_text(json.dumps([list(s) for s in result.skipped]))
    return ScanResult(Ref(str(manifest_path), key), Ref(str(counts_path), key),
                      tuple(tuple(s) for s in result.skipped))


def categorize_step(manifest: Ref, n_clusters: int | None, max_side: int, seed: int,
                    cache_dir: str) -> Ref:
    """Image-property table (brightness, colourfulness, edge density) and property clusters."""
    from . import datasets

    key = text_hash("categorize", STEP_VERSION, manifest.key, n_clusters, max_side, seed)
    path = _out(cache_dir, "tables", f"properties-{key}", ".parquet")
    if not path.exists():
        table = datasets.property_table(manifest.table(), n_clusters=n_clusters, seed=seed,
                                        max_side=max_side)
        _write_table(table, path)
    return Ref(str(path), key)


# -- 2. patches, 3. normalization ------------------------------------------------------
def patches_step(manifest: Ref, size: int | None, stride: int | None,
                 min_mean_intensity: float, cache_dir: str) -> Ref:
    key = text_hash("patches", STEP_VERSION, manifest.key, size, stride, min_mean_intensity)
    path = _out(cache_dir, "patches", key, ".parquet")
    if not path.exists():
        _write_table(plan_patches(manifest.table(), size, stride, min_mean_intensity), path)
    return Ref(str(path), key)


def _category_rows(patches: Ref, category: str) -> pd.DataFrame:
    table = patches.table()
    return table[table["category"] == category].reset_index(drop=True)


def _paths(manifest: Ref) -> dict[str, str]:
    table = manifest.table()
    return dict(zip(table["image_id"], table["path"]))


def normalization_step(patches: Ref, manifest: Ref, category: str, mode: str,
                       denoise: dict | None = None) -> dict:
    """Channel mean/std of the category's training patches (small: returned by value)."""
    return normalization_stats(_category_rows(patches, category), _paths(manifest), mode,
                               denoise)


# -- 4. features -------------------------------------------------------------------
def features_step(patches: Ref, manifest: Ref, category: str, features: dict, stats: dict,
                  cache_dir: str, progress: bool = True) -> FeatureStoreRef:
    rows = _category_rows(patches, category)
    return extract_features(rows, manifest.table(), backbone=features["backbone"],
                            layers=features["layers"], input_size=features["input_size"],
                            mean=stats["mean"], std=stats["std"], cache_dir=cache_dir,
                            batch_size=features["batch_size"], device=features["device"],
                            progress=progress, denoise=stats.get("denoise"))


def _patch_set(store: FeatureStoreRef | None, rows: pd.DataFrame, selected: np.ndarray,
               manifest: Ref, input_size: int, stats: dict, device: str = "cpu") -> PatchSet:
    """The rows of ``rows`` where ``selected`` is True, as a detector's input."""
    positions = np.flatnonzero(selected)
    return PatchSet(rows.iloc[positions].reset_index(drop=True), store, positions,
                    _paths(manifest), input_size, tuple(stats["mean"]), tuple(stats["std"]),
                    device=resolve_device(device), denoise=stats.get("denoise"))


def labelled_defects(manifest: pd.DataFrame, category: str, count: int, seed: int) -> list[str]:
    """Image ids of ``count`` defective test images of a category (seeded), for methods that
    train on a few labelled defects; they are then never scored in those methods' evaluation.
    At most half of the category's defective test images are taken, so some remain to test."""
    defective = manifest[(manifest["category"] == category) & (manifest["split"] == "test")
                         & (manifest["label"] == 1)]["image_id"].sort_values().to_numpy()
    count = min(count, len(defective) // 2)
    if count <= 0:
        return []
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(defective, size=count, replace=False).tolist())


# -- 5. train, 6. score ------------------------------------------------------------
def train_step(store: FeatureStoreRef, patches: Ref, manifest: Ref, category: str,
               method: str, method_params: dict, input_size: int, stats: dict,
               cache_dir: str, device: str = "auto") -> Ref:
    """Fit one detector on the category's training patches and save it.

    A method that needs labelled defects also gets the patches of a few
    defective test images (listed in ``train_defects.json`` beside the model).
    """
    key = text_hash("train", STEP_VERSION, store.key, category, method,
                    json.dumps(method_params, sort_keys=True))
    final = _out(cache_dir, "models", key)
    if not final.exists():
        rows = _category_rows(patches, category)
        detector_cls = METHODS[method]
        detector = detector_cls(detector_cls.Params(**method_params))
        selected = (rows["split"] == "train").to_numpy()
        defects: list[str] = []
        if detector_cls.needs_labelled_defects:
            defects = labelled_defects(manifest.table(), category,
                                       method_params.get("n_defective", 0),
                                       method_params.get("seed", 0))
            selected = selected | rows["image_id"].isin(defects).to_numpy()
        train = _patch_set(store, rows, selected, manifest, input_size, stats, device)
        if not (train.table["split"] == "train").any():
            raise DefectflowError(f"category {category!r} has no training images")
        detector.fit(train)
        partial = final.with_name(final.name + f".partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        detector.save(partial)
        (partial / "train_defects.json").write_text(json.dumps(defects))
        _finish_folder(partial, final)
    return Ref(str(final), key)


def score_step(model: Ref, store: FeatureStoreRef, patches: Ref, manifest: Ref,
               category: str, method: str, input_size: int, stats: dict,
               cache_dir: str, device: str = "auto") -> Ref:
    """Scores and anomaly maps (float16) of the category's validation and test patches,
    leaving out any image the detector trained on."""
    key = text_hash("score", STEP_VERSION, model.key, store.key, category)
    final = _out(cache_dir, "scores", key)
    if not final.exists():
        rows = _category_rows(patches, category)
        trained_on = json.loads((Path(model.path) / "train_defects.json").read_text())
        selected = (rows["split"].isin(["val", "test"])
                    & ~rows["image_id"].isin(trained_on)).to_numpy()
        batch = _patch_set(store, rows, selected, manifest, input_size, stats, device)
        detector = METHODS[method].load(model.path)
        partial = final.with_name(final.name + f".partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        # Scored in pieces and streamed to disk: memory stays bounded for any number of patches.
        size = batch.input_size
        maps = np.lib.format.open_memmap(partial / "anomaly_maps.npy", mode="w+",
                                         dtype=np.float16, shape=(len(batch), size, size))
        scores = np.zeros(len(batch), dtype=np.float32)
        for start in range(0, len(batch), SCORE_PIECE):
            part = slice(start, min(start + SCORE_PIECE, len(batch)))
            scores[part], piece_maps = detector.score(batch.subset(part))
            maps[part] = piece_maps.astype(np.float16)
        maps.flush()
        del maps
        table = batch.table.copy()
        table["score"] = scores
        table.to_parquet(partial / "scores.parquet", index=False)
        _finish_folder(partial, final)
    return Ref(str(final), key)


# -- 7. evaluate ----------------------------------------------------------------------
def image_scores(patch_scores: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """Image score = the maximum over its patches; one row per image."""
    scores = patch_scores.groupby("image_id", sort=True)["score"].max().rename("score")
    meta = manifest.set_index("image_id").loc[scores.index, ["split", "label", "defect_type"]]
    return meta.join(scores).reset_index()


def evaluate_step(scores: Ref, manifest: Ref, category: str, threshold_quantile: float,
                  overlays: int, cache_dir: str) -> Ref:
    """Metrics (image level, pixel level where masks exist), ROC plot, overlays, score table."""
    from . import evaluation

    key = text_hash("evaluate", STEP_VERSION, scores.key, threshold_quantile, overlays)
    final = _out(cache_dir, "evaluations", key)
    if final.exists():
        return Ref(str(final), key)
    partial = final.with_name(final.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    man = manifest.table()
    patch_scores = pd.read_parquet(Path(scores.path) / "scores.parquet")
    maps = np.load(Path(scores.path) / "anomaly_maps.npy", mmap_mode="r")
    images = image_scores(patch_scores, man)
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
    if is_patch_mode(patch_scores, man):
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
        metrics.update(_stitched_pixel_metrics(test_patches, maps, man))
        _save_full_image_figures(partial / "overlays", test, test_patches, maps, man, overlays)
    else:
        metrics.update(_pixel_metrics(test_patches, maps, man))
        _save_overlays(partial / "overlays", test, test_patches, maps, man, overlays)

    (partial / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
    evaluation.plot_roc(labels, values, partial / "roc.png", title=f"{category}: image ROC")
    evaluation.score_table(test["image_id"].tolist(), labels, values, threshold).to_csv(
        partial / "scores.csv", index=False)
    _finish_folder(partial, final)
    return Ref(str(final), key)


def is_patch_mode(patch_scores: pd.DataFrame, manifest: pd.DataFrame) -> bool:
    """True when images were cut into windows (some patch is smaller than its image)."""
    sizes = manifest.set_index("image_id")[["width", "height"]]
    joined = patch_scores[["image_id", "width", "height"]].join(sizes, on="image_id",
                                                                  rsuffix="_image")
    return bool(((joined["width"] != joined["width_image"])
                 | (joined["height"] != joined["height_image"])).any())


def _stitched(image_rows: pd.DataFrame, maps: np.ndarray, info) -> tuple[np.ndarray, np.ndarray]:
    """(stitched map with NaN where excluded or uncovered, excluded mask) of one image."""
    from .annotations import annotation_for_image, excluded_mask
    from .stitching import stitch

    width, height = int(info["width"]), int(info["height"])
    excluded = excluded_mask(annotation_for_image(info.get("annotation_path"), info["path"]),
                             width, height)
    windows = list(image_rows[["x", "y", "width", "height"]].itertuples(index=False, name=None))
    return stitch(maps[image_rows.index.to_numpy()], windows, width, height, excluded), excluded


PIXEL_EVAL_SIDE = 1024  # stitched maps are sampled on a grid this fine for pixel metrics


def _stitched_pixel_metrics(test_patches: pd.DataFrame, maps: np.ndarray,
                            manifest: pd.DataFrame) -> dict:
    """Pixel AUROC/AUPR on stitched maps, inspected pixels only (excluded/uncovered left out).
    Large images are sampled on a regular grid of at most PIXEL_EVAL_SIDE per side."""
    from . import evaluation
    from .stitching import covered_pixels

    man = manifest.set_index("image_id")
    truths, values = [], []
    for image_id, image_rows in test_patches.groupby("image_id", sort=True):
        info = man.loc[image_id]
        has_mask = isinstance(info["mask_path"], str)
        if not has_mask and info["label"] == 1:
            continue  # a defect without a location cannot be scored per pixel
        stitched, _ = _stitched(image_rows, maps, info)
        mask = (read_mask(info["mask_path"], (int(info["height"]), int(info["width"])))
                if has_mask else np.zeros(stitched.shape, bool))
        step = max(1, -(-max(stitched.shape) // PIXEL_EVAL_SIDE))
        truth, value = covered_pixels(stitched[::step, ::step], mask[::step, ::step])
        truths.append(truth)
        values.append(value)
    if not truths or not any(t.any() for t in truths):
        return {}
    truth = np.concatenate(truths)[None, :]
    value = np.concatenate(values)[None, :]
    return evaluation.pixel_metrics([truth.astype(bool)], [value.astype(np.float32)])


def _save_full_image_figures(folder: Path, test: pd.DataFrame, test_patches: pd.DataFrame,
                             maps: np.ndarray, manifest: pd.DataFrame, count: int) -> None:
    """Thesis Fig. 6.3 style figures (image, ground truth, stitched map, overlay)."""
    from .stitching import full_image_figure

    picks = _overlay_picks(folder, test, count)
    man = manifest.set_index("image_id")
    vmax = float(np.quantile(test_patches["score"], 0.99))
    for pick in picks:
        image_id = test["image_id"].iloc[pick]
        info = man.loc[image_id]
        image_rows = test_patches[test_patches["image_id"] == image_id]
        stitched, excluded = _stitched(image_rows, maps, info)
        mask = (read_mask(info["mask_path"], (int(info["height"]), int(info["width"])))
                if isinstance(info["mask_path"], str) else None)
        full_image_figure(read_image(info["path"]), mask, stitched, excluded,
                          folder / f"{image_id.replace('/', '_')}.png",
                          title=f"{image_id}  score {test['score'].iloc[pick]:.3f}",
                          vmin=0.0, vmax=vmax)


def _pixel_metrics(test_patches: pd.DataFrame, maps: np.ndarray, manifest: pd.DataFrame) -> dict:
    """Pixel AUROC/AUPR over the test patches, as on MVTec AD: good images count as all-normal
    masks; defective images without a mask are left out (their defect is not located)."""
    from . import evaluation

    mask_paths = dict(zip(manifest["image_id"], manifest["mask_path"]))
    if not any(isinstance(mask_paths.get(i), str) for i in test_patches["image_id"]):
        return {}
    sizes = dict(zip(manifest["image_id"], zip(manifest["height"], manifest["width"])))
    masks, pixel_maps = [], []
    for position, row in zip(test_patches.index, test_patches.itertuples(index=False)):
        mask_path = mask_paths.get(row.image_id)
        if isinstance(mask_path, str):
            masks.append(_mask_crop(row, mask_path, sizes[row.image_id], maps.shape[1:]))
        elif row.label == 0:
            masks.append(None)
        else:
            continue
        pixel_maps.append(np.asarray(maps[position], dtype=np.float32))
    metrics = evaluation.pixel_metrics(masks, pixel_maps)
    defect_masks = [m for m in masks if m is not None and m.any()]
    if defect_masks:
        # Region-level localization (MVTec AD): AUPRO up to 30% FPR, normalized.
        metrics["aupro"] = evaluation.aupro(masks, pixel_maps, fpr_limit=0.3)
    return metrics


def _mask_crop(row, mask_path: str, image_hw, map_hw) -> np.ndarray:
    import cv2

    mask = read_mask(mask_path, expected_hw=image_hw)
    crop = mask[row.y:row.y + row.height, row.x:row.x + row.width].astype(np.uint8)
    return cv2.resize(crop, (map_hw[1], map_hw[0]), interpolation=cv2.INTER_NEAREST) > 0


def _overlay_picks(folder: Path, test: pd.DataFrame, count: int) -> list[int]:
    """Create the overlay folder; the test images (positions in ``test``) to draw."""
    from . import evaluation

    folder.mkdir()
    if count <= 0:
        return []
    return evaluation.pick_overlay_examples(test["label"].to_numpy(), test["score"].to_numpy(),
                                            n=count)


def _save_overlays(folder: Path, test: pd.DataFrame, test_patches: pd.DataFrame,
                   maps: np.ndarray, manifest: pd.DataFrame, count: int) -> None:
    from . import evaluation

    picks = _overlay_picks(folder, test, count)
    if not picks:
        return
    man = manifest.set_index("image_id")
    # One colour scale for every overlay, so that maps compare by eye.
    peaks = np.asarray(maps[test_patches.index.to_numpy()], dtype=np.float32).max(axis=(1, 2))
    vmax = float(np.quantile(peaks, 0.99))
    for pick in picks:
        image_id = test["image_id"].iloc[pick]
        # The image's worst patch stands for it (the whole image when patches are images).
        patches = test_patches[test_patches["image_id"] == image_id]
        best = patches["score"].idxmax()
        row = test_patches.loc[best]
        info = man.loc[image_id]
        image = read_image(info["path"])[row.y:row.y + row.height, row.x:row.x + row.width]
        mask = None
        if isinstance(info["mask_path"], str):
            mask = read_mask(info["mask_path"], (info["height"], info["width"]))[
                row.y:row.y + row.height, row.x:row.x + row.width]
        name = image_id.replace("/", "_")
        evaluation.save_overlay(image, mask, np.asarray(maps[best], dtype=np.float32),
                                folder / f"{name}.png",
                                title=f"{image_id}  score {row.score:.3f}", vmin=0, vmax=vmax)


def device_name(device: str) -> str:
    return resolve_device(device)


# -- 7b. SegAD fusion ----------------------------------------------------------------------
def fusion_step(method_scores: dict[str, Ref], manifest: Ref, category: str, fusion: dict,
                cache_dir: str) -> Ref:
    """SegAD: per-segment statistics of every detector's anomaly maps, a boosted random forest
    trained on held-out good images plus a few labelled defects, over ``fusion["seeds"]``
    seeds. Writes per_seed.csv, scores.csv and summary.json.

    The images are those every detector scored (a supervised detector leaves out the defects
    it trained on). Only whole-image runs are fused: with patches the maps are per window.
    """
    from . import fusion as segad
    from .images import read_image

    key = text_hash("fusion", STEP_VERSION, category, json.dumps(fusion, sort_keys=True),
                    *sorted(f"{m}:{r.key}" for m, r in method_scores.items()))
    final = _out(cache_dir, "fusions", key)
    if final.exists():
        return Ref(str(final), key)
    man = manifest.table().set_index("image_id")
    detectors = sorted(method_scores)
    tables = {m: pd.read_parquet(Path(method_scores[m].path) / "scores.parquet")
              for m in detectors}
    if any(t["image_id"].duplicated().any() for t in tables.values()):
        raise DefectflowError(f"fusion needs whole images, not patches (category {category!r})")
    common = sorted(set.intersection(*(set(t["image_id"]) for t in tables.values())))
    maps = []
    for method in detectors:
        table = tables[method].reset_index(drop=True)
        rows = table.reset_index().set_index("image_id").loc[common, "index"].to_numpy()
        stored = np.load(Path(method_scores[method].path) / "anomaly_maps.npy", mmap_mode="r")
        maps.append(np.asarray(stored[np.sort(rows)])[np.argsort(np.argsort(rows))])
    size = maps[0].shape[-1]
    k = int(fusion["segments"])
    if fusion["segmentation"] == "superpixels":
        # Computed once on a reference good image of the category, applied to all (SegAD).
        reference = man[(man["category"] == category) & (man["split"] == "train")].index.min()
        segments = segad.superpixel_segments(read_image(man.loc[reference, "path"]), k, size,
                                             seed=fusion["seed"])
    else:
        segments = segad.grid_segments(size, k)
    features = segad.feature_frame(maps, segments, common, detectors)
    labels = man.loc[common, "label"].astype(int)
    splits = segad.supervised_splits(common, labels.tolist(), man.loc[common, "split"].tolist(),
                                     n_defective=fusion["n_defective"],
                                     seeds=range(fusion["seed"], fusion["seed"] + fusion["seeds"]))
    segad.assert_no_leakage(splits)
    result = segad.run_protocol(features, labels, splits, kind=fusion["classifier"],
                                baselines=[f"{d}.image_score" for d in detectors],
                                n_jobs=fusion["n_jobs"])
    partial = final.with_name(final.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    result.per_seed.to_csv(partial / "per_seed.csv", index=False)
    result.scores.to_csv(partial / "scores.csv", index=False)
    summary = {k_: float(v) for k_, v in result.summary.items()}
    summary.update(n_images=len(common), n_segments=segad.count_segments(segments),
                   detectors=",".join(detectors))
    (partial / "summary.json").write_text(json.dumps(summary, indent=1))
    _finish_folder(partial, final)
    return Ref(str(final), key)
