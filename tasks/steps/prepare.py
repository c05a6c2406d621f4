"""Steps 1-4: scan + categorize, patches, normalization, features."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .. import datasets
from ..cache import Ref, cache_path, cached_folder, write_table, write_text
from ..errors import DefectflowError
from ..feature_settings import FeatureSettings
from ..feature_sources import feature_store
from ..features import FeatureStoreRef
from ..images import MAX_IMAGE_PIXELS, text_hash
from ..methods.cutpaste_encoder import ENCODER_FILE, export_encoder
from ..normalization import normalization_stats
from ..patches import plan_patches
from .common import category_rows, image_paths, step_key


@dataclass(frozen=True)
class ScanRefs:
    """The scan's outputs: the manifest and count tables, and the files it skipped."""

    manifest: Ref
    counts: Ref
    skipped: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def exists(self) -> bool:
        """The tables are there, and so is every image or mask file the scan wrote into the
        cache (``<cache_dir>/datasets``: elpv's images, merged masks)."""
        if not (self.manifest.exists() and self.counts.exists()):
            return False
        written = Path(self.manifest.path).resolve().parents[1] / "datasets"
        table = self.manifest.table()
        files = [*table["path"], *table["mask_path"].dropna()]
        return all(Path(f).is_file() for f in files if Path(f).is_relative_to(written))


# -- 1. scan + categorize ---------------------------------------------------------
def source_fingerprint(layout: str, path: str | None) -> str:
    """Cheap stat-based fingerprint of a data source: changes when any file changes.

    It is the cache key of the scan (which hashes every file's content); the
    later steps are keyed on those content hashes.
    """
    packaged_root = datasets.REGISTRY[layout].packaged_root
    if packaged_root is not None:
        root = packaged_root()
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


def scan_step(dataset: dict, fingerprint: str, cache_dir: str) -> ScanRefs:
    """Manifest (with validation hold-out) and count table of a data source."""
    # The dataset's display name does not change the manifest: keep it out of the key.
    relevant = {k: v for k, v in dataset.items() if k != "name"}
    max_pixels = relevant.pop("max_image_pixels", MAX_IMAGE_PIXELS)
    if max_pixels != MAX_IMAGE_PIXELS:  # the default leaves the keys of earlier runs as they were
        relevant["max_image_pixels"] = max_pixels
    key = step_key("scan", fingerprint, json.dumps(relevant, sort_keys=True))
    manifest_path = cache_path(cache_dir, "manifests", key, ".parquet")
    counts_path = cache_path(cache_dir, "tables", f"counts-{key}", ".parquet")
    skipped_path = cache_path(cache_dir, "tables", f"skipped-{key}", ".json")
    if manifest_path.exists() and counts_path.exists() and skipped_path.exists():
        skipped = tuple(tuple(x) for x in json.loads(skipped_path.read_text()))
        found = ScanRefs(Ref(str(manifest_path), key), Ref(str(counts_path), key), skipped)
        if found.exists():
            return found
    result = datasets.scan_dataset(
        dataset["layout"], dataset.get("path"), category=dataset.get("category"),
        train_fraction=dataset["train_fraction"], seed=dataset["seed"],
        materialize_dir=Path(cache_dir) / "datasets", max_image_pixels=max_pixels)
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
    untrained = sorted(set(manifest["category"]) - set(
        manifest.loc[manifest["split"] == "train", "category"]))
    if untrained:
        raise DefectflowError(
            f"category {untrained[0]!r} has no good image to train on (its folder of good "
            f"training images is empty, missing, or all its images were skipped)",
            dataset.get("path") or Path(cache_dir) / "datasets" / dataset["layout"])
    write_table(manifest, manifest_path)
    write_table(datasets.count_table(manifest), counts_path)
    write_text(json.dumps([list(s) for s in result.skipped]), skipped_path)
    return ScanRefs(Ref(str(manifest_path), key), Ref(str(counts_path), key),
                    tuple(tuple(s) for s in result.skipped))


def categorize_step(manifest: Ref, n_clusters: int | None, max_side: int, seed: int,
                    cache_dir: str) -> Ref:
    """Image-property table (brightness, colourfulness, edge density) and property clusters."""
    key = step_key("categorize", manifest.key, n_clusters, max_side, seed)
    path = cache_path(cache_dir, "tables", f"properties-{key}", ".parquet")
    if not path.exists():
        table = datasets.property_table(manifest.table(), n_clusters=n_clusters, seed=seed,
                                        max_side=max_side)
        write_table(table, path)
    return Ref(str(path), key)


# -- 2. patches, 3. normalization ------------------------------------------------------
def patches_step(manifest: Ref, size: int | None, stride: int | None,
                 min_mean_intensity: float, cache_dir: str) -> Ref:
    key = step_key("patches", manifest.key, size, stride, min_mean_intensity)
    path = cache_path(cache_dir, "patches", key, ".parquet")
    if not path.exists():
        write_table(plan_patches(manifest.table(), size, stride, min_mean_intensity), path)
    return Ref(str(path), key)


def normalization_step(patches: Ref, manifest: Ref, category: str, mode: str,
                       denoise: dict | None = None) -> dict:
    """Channel mean/std of the category's training patches (small: returned by value)."""
    return normalization_stats(category_rows(patches, category), image_paths(manifest), mode,
                               denoise)


# -- 4. features -------------------------------------------------------------------
def features_step(patches: Ref, manifest: Ref, category: str, features: FeatureSettings,
                  stats: dict, cache_dir: str, progress: bool = True,
                  encoder: Ref | None = None) -> FeatureStoreRef:
    """The category's feature store; a combined source's transform is fitted on its
    training rows only. ``encoder``: the CutPaste model (``train_step`` without a store)
    whose encoder a ``cutpaste`` source reads."""
    rows = category_rows(patches, category)
    return feature_store(rows, manifest.table(), features, mean=stats["mean"],
                         std=stats["std"], cache_dir=cache_dir, progress=progress,
                         denoise=stats.get("denoise"), train=(rows["split"] == "train").to_numpy(),
                         encoder=None if encoder is None else encoder_file(encoder, cache_dir))


def encoder_file(model: Ref, cache_dir: str) -> Path:
    """The encoder of the CutPaste model ``model`` as one file, written once under
    ``<cache_dir>/encoders/<model key>/``."""
    with cached_folder(cache_dir, "encoders", model.key) as out:
        if out.missing:
            export_encoder(model.path, model.key, out.partial / ENCODER_FILE)
    return out.path / ENCODER_FILE
