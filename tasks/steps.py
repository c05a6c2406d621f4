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
from .methods import METHODS, PatchSet, source_hash
from .normalization import normalization_stats
from .patches import plan_patches
from .scoring import SCORE_PIECE, new_images_batch, patch_set, score_pieces

# datasets and evaluation (scikit-learn, matplotlib) are imported inside the steps that use
# them: a rerun whose steps all come from cache then never pays for those imports.
STEP_VERSION = "1"  # bump when a step's output format or meaning changes


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
def prepare_without_prefect(params, cache_dir: str | None = None):
    """Steps 1-3 for a benchmark, without Prefect or MLflow: (scanned, patches, cache_dir).

    Same cache as the pipeline, so features a run already extracted are found again.
    """
    cache = cache_dir or params.cache_dir
    fingerprint = source_fingerprint(params.dataset.layout, params.dataset.path)
    scanned = scan_step(params.dataset.model_dump(mode="json"), fingerprint, cache)
    patches = patches_step(scanned.manifest, params.patches.size, params.patches.stride,
                           params.patches.min_mean_intensity, cache)
    return scanned, patches, cache


def category_features_without_prefect(params, scanned: "ScanResult", patches: Ref,
                                      category: str, cache_dir: str):
    """Steps 3-4 of one category for a benchmark: (normalization stats, feature store)."""
    denoise = (params.preprocessing.denoise.model_dump(mode="json")
               if params.preprocessing.denoise else None)
    stats = {**normalization_step(patches, scanned.manifest, category, params.normalization,
                                  denoise), "denoise": denoise}
    store = features_step(patches, scanned.manifest, category,
                          params.features.model_dump(mode="json"), stats, cache_dir,
                          progress=False)
    return stats, store


def features_step(patches: Ref, manifest: Ref, category: str, features: dict, stats: dict,
                  cache_dir: str, progress: bool = True) -> FeatureStoreRef:
    rows = _category_rows(patches, category)
    return extract_features(rows, manifest.table(), backbone=features["backbone"],
                            layers=features["layers"], input_size=features["input_size"],
                            mean=stats["mean"], std=stats["std"], cache_dir=cache_dir,
                            batch_size=features["batch_size"], device=features["device"],
                            progress=progress, denoise=stats.get("denoise"))


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
               cache_dir: str, device: str = "auto", method_source: str | None = None) -> Ref:
    """Fit one detector on the category's training patches and save it.

    A method that needs labelled defects also gets the patches of a few
    defective test images (listed in ``train_defects.json`` beside the model).
    The key includes ``method_source``, the hash of the method's code
    (``methods.source_hash``, computed when not given; the flow passes it so
    that Prefect's input-keyed cache sees it too): changed code retrains.
    """
    method_source = method_source or source_hash(method)
    key = text_hash("train", STEP_VERSION, store.key, category, method,
                    json.dumps(method_params, sort_keys=True), method_source)
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
        train = patch_set(store, rows, selected, _paths(manifest), input_size, stats, device)
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
        batch = patch_set(store, rows, selected, _paths(manifest), input_size, stats, device)
        _score_into(METHODS[method].load(model.path), batch, final)
    return Ref(str(final), key)


def _score_into(detector, batch: PatchSet, final: Path) -> None:
    """Score ``batch`` and write ``scores.parquet`` + ``anomaly_maps.npy`` (float16) as the
    folder ``final``; real and synthetic images go through this one path."""
    partial = final.with_name(final.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    # Streamed to disk: memory stays bounded for any number of patches.
    size = batch.input_size
    maps = np.lib.format.open_memmap(partial / "anomaly_maps.npy", mode="w+",
                                     dtype=np.float16, shape=(len(batch), size, size))
    scores = score_pieces(detector, batch, maps)
    maps.flush()
    del maps
    table = batch.table.copy()
    table["score"] = scores
    table.to_parquet(partial / "scores.parquet", index=False)
    _finish_folder(partial, final)


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

    # The manifest key covers the masks and the saturation thresholds (defects config).
    key = text_hash("evaluate", STEP_VERSION, scores.key, manifest.key, threshold_quantile,
                    overlays)
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
        metrics.update(_spro_metrics(test_patches, maps, man))
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


SPRO_FPR_LIMIT = 0.05  # MVTec LOCO AD reports sPRO up to 5% FPR


def _spro_metrics(test_patches: pd.DataFrame, maps: np.ndarray, manifest: pd.DataFrame) -> dict:
    """sPRO (MVTec LOCO AD) where the layout gives each defect mask a saturation threshold
    (the manifest's ``defect_masks``). Computed at the anomaly maps' resolution, like the
    other pixel metrics: each defect's mask is cropped and resized to the map, a relative
    threshold is that fraction of the resized region's area, an absolute one (pixels of
    the image) is scaled by the map's pixels per image pixel. A defect that vanishes in
    the resize cannot be located and is left out; so are defective images without masks."""
    from . import evaluation

    if "defect_masks" not in manifest.columns:
        return {}
    info = manifest.set_index("image_id")
    defect_masks, saturations, pixel_maps = [], [], []
    for position, row in zip(test_patches.index, test_patches.itertuples(index=False)):
        entries = info.at[row.image_id, "defect_masks"]
        entries = json.loads(entries) if isinstance(entries, str) else None
        if entries is None and row.label == 1:
            continue  # a defect without a location
        if entries and any("saturation_threshold" not in e for e in entries):
            return {}  # no defects config: no saturation thresholds
        image_hw = (int(info.at[row.image_id, "height"]), int(info.at[row.image_id, "width"]))
        masks, thresholds = [], []
        for entry in entries or []:
            mask = _mask_crop(row, entry["path"], image_hw, maps.shape[1:])
            area = int(mask.sum())
            if area == 0:
                continue
            if entry["relative_saturation"]:
                thresholds.append(entry["saturation_threshold"] * area)
            else:
                scale = (maps.shape[1] * maps.shape[2]) / (int(row.height) * int(row.width))
                thresholds.append(entry["saturation_threshold"] * scale)
            masks.append(mask)
        if entries and not masks:
            continue  # every defect of the image vanished at the map's resolution
        defect_masks.append(masks)
        saturations.append(thresholds)
        pixel_maps.append(np.asarray(maps[position], dtype=np.float32))
    if not any(defect_masks):
        return {}
    return {"spro": evaluation.spro(defect_masks, saturations, pixel_maps,
                                    fpr_limit=SPRO_FPR_LIMIT)}


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
                cache_dir: str, models: dict[str, Ref] | None = None,
                features: dict | None = None, stats: dict | None = None) -> Ref:
    """SegAD: per-segment statistics of every detector's anomaly maps, a boosted random forest,
    over ``fusion["seeds"]`` seeds. Writes per_seed.csv, scores.csv and summary.json, and the
    forest to serve (the first seed's) with forest.json, segments.npy and fusion.json.

    ``fusion["mode"]``:

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
    from . import fusion as segad
    from .fusion.deploy import write_deployable_fusion

    mode = fusion.get("mode", "supervised")
    detectors = sorted(method_scores)
    parts = [category, json.dumps(fusion, sort_keys=True),
             *sorted(f"{m}:{r.key}" for m, r in method_scores.items())]
    if mode == "one_class":
        if models is None or features is None or stats is None \
                or set(models) != set(method_scores):
            raise DefectflowError("one-class fusion needs every detector's model, the feature "
                                  f"parameters and the normalization (category {category!r})")
        parts += [*sorted(f"{m}:{r.key}" for m, r in models.items()),
                  json.dumps(_feature_settings(features, stats), sort_keys=True)]
    # "deployable": the folder also holds the forest to serve (serving.write_deployable_fusion);
    # a new key so that folders cached before it existed are not taken for complete ones.
    key = text_hash("fusion", STEP_VERSION, "deployable", *parts)
    final = _out(cache_dir, "fusions", key)
    if final.exists():
        return Ref(str(final), key)
    man = manifest.table().set_index("image_id")
    tables = {m: pd.read_parquet(Path(method_scores[m].path) / "scores.parquet")
              for m in detectors}
    if any(t["image_id"].duplicated().any() for t in tables.values()):
        raise DefectflowError(f"fusion needs whole images, not patches (category {category!r})")
    common = sorted(set.intersection(*(set(t["image_id"]) for t in tables.values())))
    maps = [_maps_of(method_scores[m], tables[m], common) for m in detectors]
    size = maps[0].shape[-1]
    segments = _fusion_segments(fusion, man, category, size)
    features_table = segad.feature_frame(maps, segments, common, detectors)
    labels = man.loc[common, "label"].astype(int)
    seeds = range(fusion["seed"], fusion["seed"] + fusion["seeds"])
    n_synthetic = 0
    if mode == "one_class":
        val_ids = [i for i in common if man.loc[i, "split"] == "val"]
        synthetic = synthetic_step(manifest, val_ids, category, segments, list(seeds),
                                   fusion["synthetic_per_image"], cache_dir)
        synthetic_table = pd.read_parquet(Path(synthetic.path) / "manifest.parquet")
        synthetic_ids = synthetic_table["image_id"].tolist()
        synthetic_maps = [_maps_of(ref, pd.read_parquet(Path(ref.path) / "scores.parquet"),
                                   synthetic_ids)
                          for ref in (synthetic_scores_step(models[m], m, synthetic, category,
                                                            features, stats, cache_dir)
                                      for m in detectors)]
        features_table = pd.concat([features_table, segad.feature_frame(
            synthetic_maps, segments, synthetic_ids, detectors)])
        labels = pd.concat([labels, pd.Series(1, index=pd.Index(synthetic_ids), dtype=int)])
        by_seed = synthetic_table.groupby("seed")["image_id"].apply(list)
        splits = [segad.one_class_split(common, man.loc[common, "split"].tolist(),
                                        by_seed.loc[seed], seed=seed) for seed in seeds]
        n_synthetic = len(synthetic_ids)
    else:
        splits = segad.supervised_splits(common, labels.tolist(),
                                         man.loc[common, "split"].tolist(),
                                         n_defective=fusion["n_defective"], seeds=seeds)
    segad.assert_no_leakage(splits)
    result = segad.run_protocol(features_table, labels, splits, kind=fusion["classifier"],
                                baselines=[f"{d}.image_score" for d in detectors],
                                n_jobs=fusion["n_jobs"])
    partial = final.with_name(final.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    result.per_seed.to_csv(partial / "per_seed.csv", index=False)
    result.scores.to_csv(partial / "scores.csv", index=False)
    summary = {k_: float(v) for k_, v in result.summary.items()}
    summary.update(n_images=len(common), n_segments=segad.count_segments(segments),
                   detectors=",".join(detectors), mode=mode)
    if mode == "one_class":
        summary["n_synthetic"] = n_synthetic
    (partial / "summary.json").write_text(json.dumps(summary, indent=1))
    # The one forest the registry serves: the first seed's, refitted as the protocol fitted it.
    write_deployable_fusion(partial, features_table, labels, splits[0].train_ids,
                            splits[0].seed, maps, common, segments, detectors,
                            fusion["classifier"], fusion["n_jobs"], category)
    _finish_folder(partial, final)
    return Ref(str(final), key)


def _maps_of(scores: Ref, table: pd.DataFrame, image_ids: list[str]) -> np.ndarray:
    """The anomaly maps of ``image_ids`` (whole images) from a score folder, in that order."""
    table = table.reset_index(drop=True)
    rows = table.reset_index().set_index("image_id").loc[image_ids, "index"].to_numpy()
    stored = np.load(Path(scores.path) / "anomaly_maps.npy", mmap_mode="r")
    # Read in file order (memory-mapped), then put back in the requested order.
    return np.asarray(stored[np.sort(rows)])[np.argsort(np.argsort(rows))]


def _fusion_segments(fusion: dict, man: pd.DataFrame, category: str, size: int) -> np.ndarray:
    """The category's (size, size) segment map: a grid, or superpixels of one good image."""
    from . import fusion as segad

    k = int(fusion["segments"])
    if fusion["segmentation"] == "superpixels":
        # Computed once on a reference good image of the category, applied to all (SegAD).
        reference = man[(man["category"] == category) & (man["split"] == "train")].index.min()
        return segad.superpixel_segments(read_image(man.loc[reference, "path"]), k, size,
                                         seed=fusion["seed"])
    return segad.grid_segments(size, k)


def _feature_settings(features: dict, stats: dict) -> dict:
    """What decides a detector's input pixels and features (the device and batch size don't)."""
    return {"backbone": features["backbone"], "layers": list(features["layers"]),
            "input_size": int(features["input_size"]),
            "mean": [round(float(v), 6) for v in stats["mean"]],
            "std": [round(float(v), 6) for v in stats["std"]],
            "denoise": stats.get("denoise")}


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
    import cv2

    from . import fusion as segad
    from .images import file_hash

    if not val_ids:
        raise DefectflowError(f"one-class fusion needs held-out good ('val') images in category "
                              f"{category!r} (set dataset.validation_fraction > 0)")
    man = manifest.table().set_index("image_id")
    hashes = man.loc[val_ids, "content_hash"].tolist()
    segments = np.ascontiguousarray(segments, dtype=np.int32)
    key = text_hash("synthetic", STEP_VERSION, category, *sorted(hashes),
                    text_hash(segments.shape, segments.tobytes()), tuple(seeds), per_image)
    final = _out(cache_dir, "synthetic", key)
    if final.exists():
        return Ref(str(final), key)
    partial = final.with_name(final.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "images").mkdir(parents=True)
    (partial / "masks").mkdir()
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
                cv2.imwrite(str(partial / "images" / name),
                            cv2.cvtColor(defective, cv2.COLOR_RGB2BGR))
                cv2.imwrite(str(partial / "masks" / name), mask.astype(np.uint8) * 255)
                rows.append(dict(image_id=f"synthetic/{seed}/{copy}/{image_id}", path=str(path),
                                 split="synthetic", label=1, defect_type=f"synthetic_{kind}",
                                 mask_path=str(mask_path), category=category,
                                 width=int(info["width"]), height=int(info["height"]),
                                 channels=3,
                                 content_hash=file_hash(partial / "images" / name),
                                 annotation_path=None, seed=int(seed),
                                 source_image_id=image_id))
    pd.DataFrame(rows).to_parquet(partial / "manifest.parquet", index=False)
    _finish_folder(partial, final)
    return Ref(str(final), key)


def synthetic_scores_step(model: Ref, method: str, synthetic: Ref, category: str,
                          features: dict, stats: dict, cache_dir: str) -> Ref:
    """One detector's scores and anomaly maps of the synthetic images, exactly as real images
    are scored: the same whole-image patches, backbone features into the content-addressed
    feature store (same backbone, layers, input size, normalization, denoising), the
    detector loaded from its saved model and ``_score_into``. Cached under ``scores/``."""
    table = pd.read_parquet(Path(synthetic.path) / "manifest.parquet")
    rows = plan_patches(table, None, None, use_annotations=False)
    batch = new_images_batch(table, rows, features, stats, cache_dir)
    key = text_hash("score-synthetic", STEP_VERSION, model.key, batch.store.key, category)
    final = _out(cache_dir, "scores", key)
    if not final.exists():
        _score_into(METHODS[method].load(model.path), batch, final)
    return Ref(str(final), key)


# -- 8. comparison plots ---------------------------------------------------------------------
def plots_step(evaluations: dict[str, Ref], manifest: Ref, category: str,
               store: FeatureStoreRef, cache_dir: str, fusion: Ref | None = None,
               tsne_points: int = 300, seed: int = 0) -> Ref:
    """The category's comparison figures, once all its methods (and the fusion) are done:

    - ``curves.png``: image ROC and PR curves of every method on one figure (the fusion
      with its first seed's evaluation scores);
    - ``defect_types.png``: image AUROC per defect type and method (test images);
    - ``tsne.png``: t-SNE of per-image mean-pooled backbone features from the feature
      store (all layers concatenated), up to ``tsne_points`` test images (seeded sample),
      coloured by defect type ("good" for good images); none when ``tsne_points`` is 0.
    """
    from . import evaluation

    key = text_hash("plots", STEP_VERSION, category, manifest.key, store.key,
                    *sorted(f"{m}:{r.key}" for m, r in evaluations.items()),
                    fusion.key if fusion is not None else "-", tsne_points, seed)
    final = _out(cache_dir, "plots", key)
    if final.exists():
        return Ref(str(final), key)
    man = manifest.table().set_index("image_id")
    tables = {m: pd.read_csv(Path(r.path) / "scores.csv") for m, r in sorted(evaluations.items())}
    if fusion is not None:
        fused = pd.read_csv(Path(fusion.path) / "scores.csv")
        tables["segad_fusion"] = fused[fused["seed"] == fused["seed"].min()]
    partial = final.with_name(final.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    evaluation.plot_curves({m: (t["label"].to_numpy(), t["score"].to_numpy())
                            for m, t in tables.items()},
                           partial / "curves.png", title=f"{category}: image ROC and PR")
    rows = []
    for method, table in tables.items():
        types = man.loc[table["image_id"], "defect_type"].to_numpy()
        if table["label"].nunique() == 2:
            for defect, auroc in evaluation.per_defect_type_auroc(
                    table["label"].to_numpy(), table["score"].to_numpy(), types).items():
                rows.append(dict(method=method, defect_type=defect, auroc=auroc))
    if rows:
        evaluation.plot_defect_type_bars(pd.DataFrame(rows), partial / "defect_types.png",
                                         title=f"{category}: image AUROC per defect type")
    embeddings, image_ids = image_embeddings(store, man, category, tsne_points, seed)
    if len(image_ids) >= 2:
        evaluation.plot_tsne(embeddings, man.loc[image_ids, "defect_type"].tolist(),
                             partial / "tsne.png", seed=seed,
                             title=f"{category}: t-SNE of backbone features "
                                   f"({len(image_ids)} test images)")
    _finish_folder(partial, final)
    return Ref(str(final), key)


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
