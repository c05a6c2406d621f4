"""The ``mvtec_loco`` layout: MVTec LOCO AD.

``<category>/train/good/*``, ``<category>/validation/good/*`` (split "val"),
``<category>/test/<defect_type>/<stem>.png`` (``good``, ``logical_anomalies``,
``structural_anomalies``), one mask file per defect region in
``<category>/ground_truth/<defect_type>/<stem>/000.png``, ``001.png``, ...
(pixel value = the defect's ``pixel_value``), and
``<category>/defects_config.json``, a list of ``{defect_name, pixel_value,
saturation_threshold, relative_saturation}``. The masks of an image are
merged (pixel-wise OR) once into ``materialize_dir/mvtec_loco/`` (the
``mask_path``); the ``defect_masks`` column keeps, as JSON, each mask file
with its defect's saturation threshold for sPRO.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np

from ...errors import DefectflowError
from ..candidates import GOOD, MASK_SUFFIX, Candidate, ScanOptions
from ..files import category_folders, image_files, map_in_threads, subfolders, write_png_once

LOCO_CONFIG = "defects_config.json"  # saturation thresholds per defect pixel value


def find_candidates(root: Path, options: ScanOptions) -> list[Candidate]:
    """MVTec LOCO AD (see the module docstring); each defective image's mask files are
    merged into one mask, ``materialize_dir/mvtec_loco/<category>/<defect_type>/<stem>.png``."""
    mask_root = options.materialize_dir / "mvtec_loco"
    category_dirs = category_folders(
        root, options.category, "MVTec LOCO category found: expected <category>/train/good/"
    )
    candidates, merges = [], []
    for name, folder in category_dirs:
        config = _loco_config(folder / LOCO_CONFIG)
        for split, sub in (("train", "train"), ("val", "validation")):
            good = folder / sub / GOOD
            if split == "train" and not good.is_dir():
                raise DefectflowError("MVTec LOCO category has no train/good/ folder", folder)
            if good.is_dir():
                for stem, path in image_files(good):
                    candidates.append(Candidate(f"{name}/{sub}/{GOOD}/{stem}", path, 0, GOOD,
                                                name, split=split, extra={"defect_masks": None}))
        test = folder / "test"
        for defect_folder in subfolders(test) if test.is_dir() else []:
            defect_type = defect_folder.name
            label = int(defect_type != GOOD)
            for stem, path in image_files(defect_folder):
                candidate = Candidate(f"{name}/test/{defect_type}/{stem}", path, label,
                                      defect_type, name, split="test",
                                      extra={"defect_masks": None})
                mask_folder = folder / "ground_truth" / defect_type / path.stem
                if label and mask_folder.is_dir():
                    files = [p for _, p in image_files(mask_folder, (MASK_SUFFIX,))]
                    if files:
                        merges.append((candidate, files, config,
                                       mask_root / name / defect_type / f"{path.stem}.png"))
                candidates.append(candidate)

    map_in_threads(_merge_masks, merges)
    return candidates


def _merge_masks(item: tuple[Candidate, list[Path], dict[int, dict] | None, Path]) -> None:
    """Merge one image's mask files into ``target``; its mask path and defect masks point
    at them."""
    candidate, files, config, target = item
    merged, entries = None, []
    for file in files:
        values = _read_grey(file)
        if merged is not None and values.shape != merged.shape:
            raise DefectflowError(f"mask size {values.shape[1]}x{values.shape[0]} differs "
                                  f"from {files[0].name}'s {merged.shape[1]}x"
                                  f"{merged.shape[0]}", file)
        present = np.unique(values[values > 0])
        if present.size == 0:
            raise DefectflowError("defect mask is empty", file)
        merged = values > 0 if merged is None else merged | (values > 0)
        entry: dict[str, object] = {"path": str(file)}
        if config is not None:
            if present.size != 1 or int(present[0]) not in config:
                raise DefectflowError(f"mask pixel values {present.tolist()[:5]} do not name "
                                      f"one defect of {LOCO_CONFIG} (pixel values "
                                      f"{sorted(config)})", file)
            entry.update(config[int(present[0])])
        entries.append(entry)
    write_png_once(target, merged.astype(np.uint8) * 255)
    candidate.mask_path = target
    candidate.extra["defect_masks"] = json.dumps(entries)


def _read_grey(path: Path) -> np.ndarray:
    """A mask file's grey values (uint8 or uint16), keeping the values (not just > 0)."""
    data = np.fromfile(str(path), dtype=np.uint8)
    values = cv2.imdecode(data, cv2.IMREAD_ANYDEPTH) if data.size else None
    if values is None:
        raise DefectflowError("cannot decode mask (corrupt or not an image file)", path)
    return values


def _loco_config(path: Path) -> dict[int, dict] | None:
    """pixel value -> {defect_name, saturation_threshold, relative_saturation} of an MVTec
    LOCO ``defects_config.json``; None when the file is absent (then no sPRO)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DefectflowError(f"cannot read the defects config ({error})", path) from None
    if not isinstance(data, list):
        raise DefectflowError("defects config must be a list of defects", path)
    config: dict[int, dict] = {}
    for index, entry in enumerate(data):
        try:
            value = int(entry["pixel_value"])
            threshold = float(entry["saturation_threshold"])
            relative = entry["relative_saturation"]
            defect = str(entry["defect_name"])
        except (KeyError, TypeError, ValueError):
            raise DefectflowError(f"defect #{index} needs defect_name, pixel_value, "
                                  "saturation_threshold and relative_saturation", path) from None
        if not isinstance(relative, bool) or value <= 0 or not math.isfinite(threshold) \
                or threshold <= 0 or (relative and threshold > 1):
            raise DefectflowError(f"defect #{index} ({defect}): pixel_value must be > 0, "
                                  "saturation_threshold > 0 (at most 1 when relative) and "
                                  "relative_saturation true or false", path)
        if value in config:
            raise DefectflowError(f"pixel_value {value} is given twice", path)
        config[value] = {"defect_name": defect, "saturation_threshold": threshold,
                         "relative_saturation": relative}
    return config
