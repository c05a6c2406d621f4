"""Pixel and region metrics of a score folder's anomaly maps against the manifest's masks.

The maps are those ``steps`` stored (one per scored patch, at the detector's input
size): whole images are compared with their masks cropped and resized to the map,
windows of large images are stitched back to full resolution first.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd

from ..annotations import annotation_for_image, excluded_mask
from ..images import read_mask
from ..stitching import covered_pixels, stitch
from .metrics import per_defect_type_pixel_auroc, pixel_metrics
from .regions import aupro, spro

PIXEL_EVAL_SIDE = 1024  # stitched maps are sampled on a grid this fine for pixel metrics
SPRO_FPR_LIMIT = 0.05  # MVTec LOCO AD reports sPRO up to 5% FPR
AUPRO_FPR_LIMIT = 0.3  # MVTec AD reports AUPRO up to 30% FPR


def is_patch_mode(patch_scores: pd.DataFrame, manifest: pd.DataFrame) -> bool:
    """True when images were cut into windows (some patch is smaller than its image)."""
    sizes = manifest.set_index("image_id")[["width", "height"]]
    joined = patch_scores[["image_id", "width", "height"]].join(sizes, on="image_id",
                                                                  rsuffix="_image")
    return bool(((joined["width"] != joined["width_image"])
                 | (joined["height"] != joined["height_image"])).any())


def stitched_map(image_rows: pd.DataFrame, maps: np.ndarray,
                 info) -> tuple[np.ndarray, np.ndarray]:
    """(stitched map with NaN where excluded or uncovered, excluded mask) of one image."""
    width, height = int(info["width"]), int(info["height"])
    excluded = excluded_mask(annotation_for_image(info.get("annotation_path"), info["path"]),
                             width, height)
    windows = list(image_rows[["x", "y", "width", "height"]].itertuples(index=False, name=None))
    return stitch(maps[image_rows.index.to_numpy()], windows, width, height, excluded), excluded


def stitched_pixel_metrics(test_patches: pd.DataFrame, maps: np.ndarray,
                           manifest: pd.DataFrame) -> dict:
    """Pixel AUROC/AUPR and AUPRO on stitched maps, inspected pixels only (excluded/uncovered
    left out). Large images are sampled on a regular grid of at most PIXEL_EVAL_SIDE per side."""
    man = manifest.set_index("image_id")
    truths, values = [], []
    sampled_masks, sampled_maps = [], []  # 2-D, for AUPRO's connected regions
    for image_id, image_rows in test_patches.groupby("image_id", sort=True):
        info = man.loc[image_id]
        has_mask = isinstance(info["mask_path"], str)
        if not has_mask and info["label"] == 1:
            continue  # a defect without a location cannot be scored per pixel
        stitched, _ = stitched_map(image_rows, maps, info)
        mask = (read_mask(info["mask_path"], (int(info["height"]), int(info["width"])))
                if has_mask else np.zeros(stitched.shape, bool))
        step = max(1, -(-max(stitched.shape) // PIXEL_EVAL_SIDE))
        sampled_map, sampled_mask = stitched[::step, ::step], mask[::step, ::step]
        truth, value = covered_pixels(sampled_map, sampled_mask)
        truths.append(truth)
        values.append(value)
        sampled_masks.append(sampled_mask if has_mask else None)
        sampled_maps.append(sampled_map)
    if not truths or not any(t.any() for t in truths):
        return {}
    truth = np.concatenate(truths)[None, :]
    value = np.concatenate(values)[None, :]
    metrics = pixel_metrics([truth.astype(bool)], [value.astype(np.float32)])
    # Region-level localization (MVTec AD) on the same sampled grid; NaN: not inspected.
    metrics["aupro"] = aupro(sampled_masks, sampled_maps, fpr_limit=AUPRO_FPR_LIMIT)
    return metrics


def patch_pixel_metrics(test_patches: pd.DataFrame, maps: np.ndarray,
                        manifest: pd.DataFrame) -> dict:
    """Pixel AUROC/AUPR over the test patches, as on MVTec AD: good images count as all-normal
    masks; defective images without a mask are left out (their defect is not located)."""
    mask_paths = dict(zip(manifest["image_id"], manifest["mask_path"]))
    if not any(isinstance(mask_paths.get(i), str) for i in test_patches["image_id"]):
        return {}
    sizes = dict(zip(manifest["image_id"], zip(manifest["height"], manifest["width"])))
    types = dict(zip(manifest["image_id"], manifest["defect_type"]))
    masks, pixel_maps, kinds, labels = [], [], [], []
    for position, row in zip(test_patches.index, test_patches.itertuples(index=False)):
        mask_path = mask_paths.get(row.image_id)
        if isinstance(mask_path, str):
            masks.append(mask_crop(row, mask_path, sizes[row.image_id], maps.shape[1:]))
        elif row.label == 0:
            masks.append(None)
        else:
            continue
        pixel_maps.append(np.asarray(maps[position], dtype=np.float32))
        kinds.append(types[row.image_id])
        labels.append(int(row.label))
    metrics = pixel_metrics(masks, pixel_maps)
    if len({kind for kind, label in zip(kinds, labels) if label}) > 1:
        # Two or more defect types: each one's pixel AUROC against the good images.
        for defect, auroc in per_defect_type_pixel_auroc(masks, pixel_maps, kinds,
                                                         labels).items():
            metrics[f"pixel_auroc.{defect}"] = auroc
    defect_masks = [m for m in masks if m is not None and m.any()]
    if defect_masks:
        # Region-level localization (MVTec AD): AUPRO up to 30% FPR, normalized.
        metrics["aupro"] = aupro(masks, pixel_maps, fpr_limit=AUPRO_FPR_LIMIT)
    return metrics


def spro_metrics(test_patches: pd.DataFrame, maps: np.ndarray, manifest: pd.DataFrame) -> dict:
    """sPRO (MVTec LOCO AD) where the layout gives each defect mask a saturation threshold
    (the manifest's ``defect_masks``). Computed at the anomaly maps' resolution, like the
    other pixel metrics: each defect's mask is cropped and resized to the map, a relative
    threshold is that fraction of the resized region's area, an absolute one (pixels of
    the image) is scaled by the map's pixels per image pixel. A defect that vanishes in
    the resize cannot be located and is left out; so are defective images without masks."""
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
            mask = mask_crop(row, entry["path"], image_hw, maps.shape[1:])
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
    return {"spro": spro(defect_masks, saturations, pixel_maps, fpr_limit=SPRO_FPR_LIMIT)}


def mask_crop(row, mask_path: str, image_hw, map_hw) -> np.ndarray:
    """The patch ``row``'s window of the mask, resized to the anomaly map (nearest)."""
    mask = read_mask(mask_path, expected_hw=image_hw)
    crop = mask[row.y:row.y + row.height, row.x:row.x + row.width].astype(np.uint8)
    return cv2.resize(crop, (map_hw[1], map_hw[0]), interpolation=cv2.INTER_NEAREST) > 0
