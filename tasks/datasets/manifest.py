"""Scanning image datasets into a manifest, and describing what the manifest holds.

A *manifest* is a DataFrame with one row per image (see ``MANIFEST_COLUMNS``):
where the file is, which split it belongs to, its label and defect type, its
ground-truth mask if any, its size and the hash of its bytes. Every later step
works from the manifest, never from the folder layout, so a new dataset layout
only needs a reader in ``layouts/`` (each layout's module describes it).

Outside MVTec AD, MVTec LOCO and ``large`` the split is drawn: a seeded
``train_fraction`` of each category's good images is "train", the rest of the
good images and all defective images are "test".

Every manifest has an ``annotation_path`` column: the thesis annotation file
that applies to the image, or None (all layouts but ``large``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from ..annotations import check_annotation, load_annotations
from ..errors import DefectflowError
from ..images import MAX_IMAGE_PIXELS, file_hash, image_header, mask_levels, text_hash
from .candidates import DEFECT, GOOD, Candidate, ScanOptions
from .files import map_in_threads
from .layouts import LAYOUTS, REGISTRY

MANIFEST_COLUMNS = (
    "image_id",
    "path",
    "split",
    "label",
    "defect_type",
    "mask_path",
    "category",
    "width",
    "height",
    "channels",
    "content_hash",
    "annotation_path",
)

# The order in which count tables list splits: the order the pipeline uses them.
_SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


@dataclass
class ScanResult:
    """What :func:`scan_dataset` found.

    ``manifest`` has one row per usable image; ``skipped`` lists the image
    files that could not be read, as ``(path, reason)``.
    """

    manifest: pd.DataFrame
    skipped: list[tuple[str, str]] = field(default_factory=list)


# --------------------------------------------------------------------------- scanning


def scan_dataset(
    layout: str,
    source: str | Path | None,
    *,
    category: str | None = None,
    train_fraction: float = 0.8,
    seed: int = 0,
    materialize_dir: str | Path = ".defectflow-cache/datasets",
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> ScanResult:
    """Scan a dataset into a manifest: one row per image, sorted by ``image_id``.

    Args:
        layout: one of ``LAYOUTS`` (see ``layouts/``, one module per layout).
        source: the dataset folder. For ``mvtec`` either one category folder
            (it holds ``train/``) or a folder of category folders. Ignored
            for ``elpv``, whose images come from the ``elpv-dataset`` package.
        category: for ``mvtec`` with a folder of categories and for ``elpv``
            ("mono" or "poly"), the one category to keep (default: all). For
            ``mvtec`` with one category folder, ``magnetic_tile`` and
            ``folder``, the category name to record (default: the category
            folder's name, "magnetic_tile", the root folder's name).
        train_fraction: share of each category's good images put in "train"
            (in (0, 1]); the other good images and all defective images are
            "test". When a category has at least two good images and the
            fraction is below 1, at least one lands on each side. Not used
            for ``mvtec`` and ``large``, whose folders give the split.
        seed: seed of the train/test draw (an integer >= 0). The same files
            and seed give the same manifest; each category is drawn from its
            own generator, so adding a category does not reshuffle another.
        materialize_dir: where ``elpv`` writes its images as PNG files,
            under ``elpv/<category>/<index>.png``, and ``bsdata`` its masks,
            under ``bsdata/masks/<stem>.png``. A file already holding the
            same pixels is left alone, so its content hash stays stable.
        max_image_pixels: an image whose header gives more pixels is skipped without
            being decoded (a decompression bomb costs nothing).

    Returns:
        A :class:`ScanResult`. The manifest columns are ``MANIFEST_COLUMNS``
        (``elpv`` adds ``defect_probability``, ``bsdata`` ``authors_split``).
        Masks are looked up for defective images only, except for
        ``magnetic_tile`` and ``large``, which keep the mask of every image
        that has one (MT_Free's are all black).

    Corrupt, unreadable or oversized image files are *skipped*: each one raises a
    ``UserWarning`` naming the file and is listed in ``ScanResult.skipped``
    with the reason, so one bad file does not stop a scan of thousands.
    Masks are binary: a mask with values other than 0 and 255 (say 0/1, or a
    JPEG's noise) counts every pixel > 0 as defective, and one ``UserWarning``
    per scan names the first such mask and how many there are.

    Raises:
        DefectflowError: naming the path, when the source folder is missing,
            the layout is unknown, the layout's expected folders are absent,
            no usable image is left, a mask cannot be read, or a mask's size
            differs from its image's (checked here, so it surfaces early),
            or an annotation file is malformed or has a box outside its image.
    """
    if layout not in LAYOUTS:
        raise DefectflowError(
            f"unknown dataset layout {layout!r}; valid layouts: {', '.join(LAYOUTS)}"
        )
    if not 0.0 < train_fraction <= 1.0:
        raise DefectflowError(f"train_fraction must be in (0, 1], got {train_fraction}")

    reader = REGISTRY[layout]
    options = ScanOptions(category, train_fraction, seed,
                          Path(materialize_dir).expanduser().resolve())
    if not reader.needs_source:
        root = options.materialize_dir / layout
    else:
        if source is None:
            raise DefectflowError(f"the {layout!r} layout needs a source folder")
        root = Path(source).expanduser().resolve()
        if not root.exists():
            raise DefectflowError("dataset folder not found", root)
        if not root.is_dir():
            raise DefectflowError("dataset source is not a folder", root)
    candidates = reader.find_candidates(root, options)

    rows, skipped = _read_candidates(candidates, max_image_pixels)
    if not rows:
        raise DefectflowError(f"no usable images found for the {layout!r} layout", root)
    _check_annotations(rows)
    _draw_train_split(rows, train_fraction, seed)

    extra_columns = sorted({key for row in rows for key in row} - set(MANIFEST_COLUMNS))
    manifest = pd.DataFrame(rows, columns=[*MANIFEST_COLUMNS, *extra_columns])
    integer_columns = ("label", "width", "height", "channels")
    manifest = manifest.astype({column: "int64" for column in integer_columns})
    # Object dtype keeps missing paths as None (pandas' string dtype would turn them into NaN).
    text_columns = ["mask_path", "annotation_path"] + [
        column for column in extra_columns
        if all(isinstance(row.get(column), (str, type(None))) for row in rows)
    ]
    for column in text_columns:
        manifest[column] = pd.Series([row.get(column) for row in rows], dtype=object)
    manifest = manifest.sort_values("image_id", kind="stable").reset_index(drop=True)
    return ScanResult(manifest=manifest, skipped=skipped)


def _read_candidates(candidates: list[Candidate], max_pixels: int = MAX_IMAGE_PIXELS
                     ) -> tuple[list[dict], list[tuple[str, str]]]:
    """Open every candidate: size, hash and mask check; unreadable images are skipped."""
    rows: list[dict] = []
    skipped: list[tuple[str, str]] = []
    inspected = map_in_threads(partial(_inspect_candidate, max_pixels=max_pixels), candidates)
    not_binary: list[tuple[str, list[int]]] = []
    # Warnings are raised here, in the calling thread, where warning filters and pytest see them.
    for candidate, (row, reason) in zip(candidates, inspected):
        if row is None:
            message = f"skipping unreadable image {candidate.path}: {reason}"
            warnings.warn(message, UserWarning, stacklevel=3)
            skipped.append((str(candidate.path), reason))
        else:
            mask_values = row.pop("_mask_values", None)
            if mask_values is not None:
                not_binary.append((row["mask_path"], mask_values))
            rows.append(row)
    if not_binary:
        first, values = not_binary[0]
        shown = ", ".join(map(str, values[:6])) + (" ..." if len(values) > 6 else "")
        warnings.warn(f"{first}: mask has values other than 0 and 255 ({shown}); every pixel "
                      f"> 0 counts as defective ({len(not_binary)} such mask file(s))",
                      UserWarning, stacklevel=3)
    return rows, skipped


def _inspect_candidate(candidate: Candidate, max_pixels: int = MAX_IMAGE_PIXELS
                       ) -> tuple[dict | None, str | None]:
    """A manifest row for one image, or (None, reason) when the image cannot be read."""
    try:
        width, height, channels = image_header(candidate.path, max_pixels)
    except Exception as error:  # noqa: BLE001 - whatever the decoder raised: skip the image
        return None, error.problem if isinstance(error, DefectflowError) else (
            f"{type(error).__name__}: {error}")
    label, defect_type = candidate.label, candidate.defect_type
    mask_values = None
    if candidate.mask_path is not None:
        # Raises, naming the mask file.
        values = mask_levels(candidate.mask_path, expected_hw=(height, width))
        mask_values = [v for v in values if v not in (0, 255)] or None
        if candidate.label_from_mask:
            label = int(values.max() > 0)
            defect_type = DEFECT if label else GOOD
    row = {
        "image_id": candidate.image_id,
        "path": str(candidate.path),
        "split": candidate.split,
        "label": label,
        "defect_type": defect_type,
        "mask_path": None if candidate.mask_path is None else str(candidate.mask_path),
        "category": candidate.category,
        "width": width,
        "height": height,
        "channels": channels,
        "content_hash": file_hash(candidate.path),
        "annotation_path": (
            None if candidate.annotation_path is None else str(candidate.annotation_path)
        ),
        **candidate.extra,
    }
    if mask_values is not None:
        row["_mask_values"] = mask_values  # warned about once, in the calling thread
    return row, None


def _check_annotations(rows: list[dict]) -> None:
    """Load each annotation file once and check its boxes against the images' sizes.

    An entry that names no scanned image of the file's category is most likely
    a typo, which would leave that image unannotated: it is warned about.
    """
    by_file: dict[str, list[dict]] = {}
    for row in rows:
        if row.get("annotation_path"):
            by_file.setdefault(row["annotation_path"], []).append(row)
    for json_path, file_rows in by_file.items():
        annotations = load_annotations(json_path)
        names = set()
        for row in file_rows:
            name = Path(row["path"]).name
            names.add(name)
            if name in annotations:
                check_annotation(annotations[name], row["width"], row["height"], json_path, name)
        unmatched = sorted(set(annotations) - names)
        if unmatched:
            shown = ", ".join(unmatched[:5]) + (" ..." if len(unmatched) > 5 else "")
            warnings.warn(
                f"{json_path}: {len(unmatched)} annotation entries name no scanned image: {shown}",
                UserWarning,
                stacklevel=3,
            )



def _draw_train_split(rows: list[dict], train_fraction: float, seed: int) -> None:
    """Fill in the split of rows that have none: seeded train share of good images, rest test."""
    good_ids: dict[str, list[str]] = {}
    for row in rows:
        if row["split"] is None and row["label"] == 0:
            good_ids.setdefault(row["category"], []).append(row["image_id"])

    train_ids: set[str] = set()
    for category, ids in good_ids.items():
        ids = sorted(ids)  # the draw must not depend on the order files were listed in
        n_train = _share(len(ids), train_fraction)
        if train_fraction < 1.0 and len(ids) >= 2:
            n_train = min(max(n_train, 1), len(ids) - 1)  # keep good images on both sides
        order = _category_rng(seed, "train", category).permutation(len(ids))
        train_ids.update(ids[i] for i in order[:n_train])

    for row in rows:
        if row["split"] is None:
            row["split"] = "train" if row["image_id"] in train_ids else "test"


def _share(n: int, fraction: float) -> int:
    """``fraction`` of ``n``, rounded half up (Python's round() rounds half to even)."""
    return int(math.floor(n * fraction + 0.5))


def _category_rng(seed: int, purpose: str, category: str) -> np.random.Generator:
    """A generator per (seed, purpose, category): one category's draw ignores the others."""
    if seed < 0:
        raise DefectflowError(f"seed must be an integer >= 0, got {seed}")
    return np.random.default_rng([seed, int(text_hash(purpose, category)[:16], 16)])


# --------------------------------------------------------------------------- splits and tables


def require_columns(manifest: pd.DataFrame, columns: tuple[str, ...]) -> None:
    missing = [column for column in columns if column not in manifest.columns]
    if missing:
        raise DefectflowError(f"manifest lacks columns: {', '.join(missing)}")


def holdout_validation(
    manifest: pd.DataFrame, fraction: float = 0.1, seed: int = 0
) -> pd.DataFrame:
    """A copy of ``manifest`` with a seeded share of each category's train good images as "val".

    Validation images are held out from fitting and used to pick thresholds
    without looking at test labels. A category with at least two train good
    images gives at least one (and keeps at least one for training); with
    ``fraction`` 0 nothing moves. Only rows with split "train" and label 0
    can move.
    """
    require_columns(manifest, ("image_id", "split", "label", "category"))
    if not 0.0 <= fraction < 1.0:
        raise DefectflowError(f"validation fraction must be in [0, 1), got {fraction}")
    result = manifest.copy()
    if fraction == 0.0:
        return result

    # A layout with its own validation images (MVTec LOCO) keeps them, and only them.
    has_val = set(result.loc[result["split"] == "val", "category"])
    train_good = result[(result["split"] == "train") & (result["label"] == 0)
                        & ~result["category"].isin(has_val)]
    val_ids: list[str] = []
    for category, group in train_good.groupby("category", sort=True):
        ids = sorted(group["image_id"])
        if len(ids) < 2:
            continue
        n_val = min(max(_share(len(ids), fraction), 1), len(ids) - 1)
        order = _category_rng(seed, "validation", str(category)).permutation(len(ids))
        val_ids.extend(ids[i] for i in order[:n_val])
    result.loc[result["image_id"].isin(val_ids), "split"] = "val"
    return result


def count_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """Number of images per category, split and defect type.

    Columns ``category, split, defect_type, n_images``; sorted by category,
    then split in pipeline order (train, val, test, then any other), then
    defect type with "good" first.
    """
    require_columns(manifest, ("category", "split", "defect_type"))
    keys = ["category", "split", "defect_type"]
    counts = manifest.groupby(keys).size().rename("n_images").reset_index()
    counts["n_images"] = counts["n_images"].astype("int64")
    counts["_split_order"] = counts["split"].map(_SPLIT_ORDER).fillna(len(_SPLIT_ORDER))
    counts["_not_good"] = counts["defect_type"] != GOOD
    counts = counts.sort_values(
        ["category", "_split_order", "split", "_not_good", "defect_type"], kind="stable"
    )
    return counts.drop(columns=["_split_order", "_not_good"]).reset_index(drop=True)

