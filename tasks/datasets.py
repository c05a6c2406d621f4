"""Scanning image datasets into a manifest, and describing what the manifest holds.

A *manifest* is a DataFrame with one row per image (see ``MANIFEST_COLUMNS``):
where the file is, which split it belongs to, its label and defect type, its
ground-truth mask if any, its size and the hash of its bytes. Every later step
works from the manifest, never from the folder layout, so a new dataset layout
only needs a reader here.

Layouts (the ``layout`` argument of :func:`scan_dataset`):

``mvtec``
    MVTec AD: ``<category>/train/good/*``, ``<category>/test/<defect_type>/*``,
    masks in ``<category>/ground_truth/<defect_type>/<stem>_mask.png`` (or
    ``<stem>.png``). The split comes from the folders.
``mvtec_loco``
    MVTec LOCO AD: ``<category>/train/good/*``, ``<category>/validation/good/*``
    (split "val"), ``<category>/test/<defect_type>/<stem>.png`` (``good``,
    ``logical_anomalies``, ``structural_anomalies``), one mask file per defect
    region in ``<category>/ground_truth/<defect_type>/<stem>/000.png``,
    ``001.png``, ... (pixel value = the defect's ``pixel_value``), and
    ``<category>/defects_config.json``, a list of ``{defect_name, pixel_value,
    saturation_threshold, relative_saturation}``. The masks of an image are
    merged (pixel-wise OR) once into ``materialize_dir/mvtec_loco/`` (the
    ``mask_path``); the ``defect_masks`` column keeps, as JSON, each mask
    file with its defect's saturation threshold for sPRO.
``elpv``
    The ELPV solar-cell images shipped by the ``elpv-dataset`` package,
    written once as PNG files under ``materialize_dir``.
``magnetic_tile``
    Magnetic Tile Defects: ``MT_<Defect>/Imgs/<stem>.jpg`` with a same-stem
    ``.png`` mask; ``MT_Free`` holds the good images.
``folder``
    A generic folder: ``good/*`` and one folder of images per defect type,
    masks optionally in ``masks/<defect_type>/`` or ``masks/``.
``large``
    Large production images (kitchen-board thesis, section 3.2.3):
    ``<category>/train/*`` (good), ``<category>/test/*`` with a ground-truth
    mask beside each test image, ``<stem>_groundtruth.png`` or
    ``<stem>groundtruth.png`` (a missing one is an error). A test image is
    defective (defect type "defect") when its mask has any positive pixel,
    else "good". An optional ``<category>/annotations.json`` (thesis format,
    see ``annotations.py``) gives active areas and excluded regions; its path
    is every row's ``annotation_path``. The split comes from the folders.
``bsdata``
    BSData (ball-screw drive surfaces): ``data/*.jpg``, LabelMe polygons in
    ``label/<stem>.json``, the authors' split in ``image_data.json``. Images
    with a label file are defective ("pitting"); their polygons are written
    once as PNG masks under ``materialize_dir/bsdata/masks/``. See
    :func:`_bsdata_candidates` for the split.

Outside MVTec AD and ``large`` the split is drawn: a seeded ``train_fraction``
of each category's good images is "train", the rest of the good images and all
defective images are "test".

Every manifest has an ``annotation_path`` column: the thesis annotation file
that applies to the image, or None (all layouts but ``large``).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np
import pandas as pd

from .annotations import check_annotation, labelme_mask, load_annotations
from .errors import DefectflowError
from .images import IMAGE_SUFFIXES, file_hash, image_header, read_image, read_mask, text_hash

LAYOUTS = ("mvtec", "mvtec_loco", "elpv", "magnetic_tile", "folder", "large", "bsdata")

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

T = TypeVar("T")
R = TypeVar("R")

GOOD = "good"
MASK_SUFFIX = ".png"
DEFECT = "defect"  # the defect type of a "large" test image whose mask is not empty
GROUNDTRUTH_SUFFIX = "groundtruth.png"  # "large" layout masks: <stem>[_]groundtruth.png
ANNOTATION_FILE = "annotations.json"
LOCO_CONFIG = "defects_config.json"  # MVTec LOCO: saturation thresholds per defect pixel value

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


@dataclass
class _Candidate:
    """An image file a layout reader found, before its file is opened."""

    image_id: str
    path: Path
    label: int
    defect_type: str
    category: str
    mask_path: Path | None = None
    split: str | None = None  # None: drawn later from train_fraction
    extra: dict[str, object] = field(default_factory=dict)
    annotation_path: Path | None = None
    label_from_mask: bool = False  # label (and defect type) from whether the mask is empty


# --------------------------------------------------------------------------- scanning


def scan_dataset(
    layout: str,
    source: str | Path | None,
    *,
    category: str | None = None,
    train_fraction: float = 0.8,
    seed: int = 0,
    materialize_dir: str | Path = ".defectflow-cache/datasets",
) -> ScanResult:
    """Scan a dataset into a manifest: one row per image, sorted by ``image_id``.

    Args:
        layout: one of ``LAYOUTS`` (see the module docstring).
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

    Returns:
        A :class:`ScanResult`. The manifest columns are ``MANIFEST_COLUMNS``
        (``elpv`` adds ``defect_probability``, ``bsdata`` ``authors_split``).
        Masks are looked up for defective images only, except for
        ``magnetic_tile`` and ``large``, which keep the mask of every image
        that has one (MT_Free's are all black).

    Corrupt or unreadable image files are *skipped*: each one raises a
    ``UserWarning`` naming the file and is listed in ``ScanResult.skipped``
    with the reason, so one bad file does not stop a scan of thousands.

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

    if layout == "elpv":
        root = Path(materialize_dir).expanduser().resolve() / "elpv"
        candidates = _elpv_candidates(root, category)
    else:
        if source is None:
            raise DefectflowError(f"the {layout!r} layout needs a source folder")
        root = Path(source).expanduser().resolve()
        if not root.exists():
            raise DefectflowError("dataset folder not found", root)
        if not root.is_dir():
            raise DefectflowError("dataset source is not a folder", root)
        readers = {
            "mvtec": _mvtec_candidates,
            "magnetic_tile": _magnetic_tile_candidates,
            "folder": _folder_candidates,
            "large": _large_candidates,
        }
        if layout == "bsdata":
            masks = Path(materialize_dir).expanduser().resolve() / "bsdata" / "masks"
            candidates = _bsdata_candidates(root, category, masks, train_fraction, seed)
        elif layout == "mvtec_loco":
            masks = Path(materialize_dir).expanduser().resolve() / "mvtec_loco"
            candidates = _mvtec_loco_candidates(root, category, masks)
        else:
            candidates = readers[layout](root, category)

    rows, skipped = _read_candidates(candidates)
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


def _read_candidates(candidates: list[_Candidate]) -> tuple[list[dict], list[tuple[str, str]]]:
    """Open every candidate: size, hash and mask check; unreadable images are skipped."""
    rows: list[dict] = []
    skipped: list[tuple[str, str]] = []
    inspected = _map_in_threads(_inspect_candidate, candidates)
    # Warnings are raised here, in the calling thread, where warning filters and pytest see them.
    for candidate, (row, reason) in zip(candidates, inspected):
        if row is None:
            message = f"skipping unreadable image {candidate.path}: {reason}"
            warnings.warn(message, UserWarning, stacklevel=3)
            skipped.append((str(candidate.path), reason))
        else:
            rows.append(row)
    return rows, skipped


def _inspect_candidate(candidate: _Candidate) -> tuple[dict | None, str | None]:
    """A manifest row for one image, or (None, reason) when the image cannot be read."""
    try:
        width, height, channels = image_header(candidate.path)
    except (DefectflowError, OSError) as error:
        return None, error.problem if isinstance(error, DefectflowError) else str(error)
    label, defect_type = candidate.label, candidate.defect_type
    if candidate.mask_path is not None:
        # Raises, naming the mask file.
        mask = read_mask(candidate.mask_path, expected_hw=(height, width))
        if candidate.label_from_mask:
            label = int(mask.any())
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


def _map_in_threads(function: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[function(item) for item in items]`` on a few threads.

    The work is decoding and hashing files, which OpenCV and hashlib do
    without holding the GIL. The first error is raised and the rest of the
    work is cancelled, so a bad mask fails a large scan quickly.
    """
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        return list(pool.map(function, items))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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


def _image_files(
    folder: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES
) -> list[tuple[str, Path]]:
    """Image files of one folder as (name for the image id, path), sorted.

    The name is the file's stem, or its full name when two files share a stem
    (``a.png`` and ``a.jpg``), so image ids stay unique. Hidden files (macOS
    ``._*`` resource forks, ``.DS_Store``) are not images and are ignored.
    """
    files = sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in suffixes
    )
    stem_counts = Counter(path.stem for path in files)
    return [(path.stem if stem_counts[path.stem] == 1 else path.name, path) for path in files]


def _subfolders(folder: Path) -> list[Path]:
    return sorted(
        path for path in folder.iterdir() if path.is_dir() and not path.name.startswith(".")
    )


def _find_mask(stem: str, folders: list[Path], names: tuple[str, ...]) -> Path | None:
    """The first existing mask file ``folder / name.format(stem=stem)``, in the given order."""
    for folder in folders:
        for name in names:
            path = folder / name.format(stem=stem)
            if path.is_file():
                return path
    return None


def _category_folders(root: Path, category: str | None, expected: str) -> list[tuple[str, Path]]:
    """(category name, folder) of one category folder (it holds ``train/``) or of a folder
    of category folders; ``category`` selects one of several, or names the single one."""
    if (root / "train").is_dir():  # one category folder
        return [(category or root.name, root)]
    found = [path for path in _subfolders(root) if (path / "train").is_dir()]
    if not found:
        raise DefectflowError(f"no {expected} in this folder", root)
    if category is not None:
        selected = [path for path in found if path.name == category]
        if not selected:
            names = ", ".join(path.name for path in found)
            raise DefectflowError(
                f"category {category!r} not found; categories here: {names}", root
            )
        found = selected
    return [(path.name, path) for path in found]


def _mvtec_candidates(root: Path, category: str | None) -> list[_Candidate]:
    category_dirs = _category_folders(
        root,
        category,
        "MVTec AD category found: expected <category>/train/good/ or train/good/",
    )
    candidates = []
    for name, folder in category_dirs:
        train_good = folder / "train" / GOOD
        if not train_good.is_dir():
            raise DefectflowError("MVTec AD category has no train/good/ folder", folder)
        for stem, path in _image_files(train_good):
            image_id = f"{name}/train/{GOOD}/{stem}"
            candidates.append(_Candidate(image_id, path, 0, GOOD, name, split="train"))
        test = folder / "test"
        if not test.is_dir():
            continue
        for defect_folder in _subfolders(test):
            defect_type = defect_folder.name
            label = int(defect_type != GOOD)
            mask_folder = folder / "ground_truth" / defect_type
            for stem, path in _image_files(defect_folder):
                mask = None
                if label:
                    mask = _find_mask(path.stem, [mask_folder], ("{stem}_mask.png", "{stem}.png"))
                # train/good and test/good reuse file names, so the split is part of the id.
                image_id = f"{name}/test/{defect_type}/{stem}"
                candidates.append(
                    _Candidate(image_id, path, label, defect_type, name, mask, split="test")
                )
    return candidates


def _mvtec_loco_candidates(root: Path, category: str | None, mask_root: Path
                           ) -> list[_Candidate]:
    """MVTec LOCO AD (see the module docstring); each defective image's mask files are
    merged into one mask under ``mask_root/<category>/<defect_type>/<stem>.png``."""
    category_dirs = _category_folders(
        root, category, "MVTec LOCO category found: expected <category>/train/good/"
    )
    candidates, merges = [], []
    for name, folder in category_dirs:
        config = _loco_config(folder / LOCO_CONFIG)
        for split, sub in (("train", "train"), ("val", "validation")):
            good = folder / sub / GOOD
            if split == "train" and not good.is_dir():
                raise DefectflowError("MVTec LOCO category has no train/good/ folder", folder)
            if good.is_dir():
                for stem, path in _image_files(good):
                    candidates.append(_Candidate(f"{name}/{sub}/{GOOD}/{stem}", path, 0, GOOD,
                                                 name, split=split, extra={"defect_masks": None}))
        test = folder / "test"
        for defect_folder in _subfolders(test) if test.is_dir() else []:
            defect_type = defect_folder.name
            label = int(defect_type != GOOD)
            for stem, path in _image_files(defect_folder):
                candidate = _Candidate(f"{name}/test/{defect_type}/{stem}", path, label,
                                       defect_type, name, split="test",
                                       extra={"defect_masks": None})
                mask_folder = folder / "ground_truth" / defect_type / path.stem
                if label and mask_folder.is_dir():
                    files = [p for _, p in _image_files(mask_folder, (MASK_SUFFIX,))]
                    if files:
                        merges.append((candidate, files, config,
                                       mask_root / name / defect_type / f"{path.stem}.png"))
                candidates.append(candidate)

    def merge(item) -> None:
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
        _write_png_once(target, merged.astype(np.uint8) * 255)
        candidate.mask_path = target
        candidate.extra["defect_masks"] = json.dumps(entries)

    _map_in_threads(merge, merges)
    return candidates


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


def _magnetic_tile_candidates(root: Path, category: str | None) -> list[_Candidate]:
    defect_folders = [path for path in _subfolders(root) if path.name.startswith("MT_")]
    if not defect_folders:
        raise DefectflowError(
            "no MT_* folders found (the magnetic_tile layout expects MT_*/Imgs/*.jpg)", root
        )
    category = category or "magnetic_tile"
    candidates = []
    for folder in defect_folders:
        images = folder / "Imgs"
        if not images.is_dir():
            raise DefectflowError("Magnetic Tile folder has no Imgs/ folder", folder)
        defect_type = folder.name[len("MT_") :].lower()
        defect_type = GOOD if defect_type == "free" else defect_type
        label = int(defect_type != GOOD)
        # The .png files beside the images are their masks.
        image_suffixes = tuple(suffix for suffix in IMAGE_SUFFIXES if suffix != MASK_SUFFIX)
        for stem, path in _image_files(images, image_suffixes):
            mask = _find_mask(path.stem, [images], ("{stem}.png",))
            image_id = f"{category}/{defect_type}/{stem}"
            candidates.append(_Candidate(image_id, path, label, defect_type, category, mask))
    return candidates


def _folder_candidates(root: Path, category: str | None) -> list[_Candidate]:
    if not (root / GOOD).is_dir():
        raise DefectflowError(
            "no good/ folder (the folder layout expects good/ and one folder per defect type)", root
        )
    category = category or root.name
    masks = root / "masks"
    candidates = []
    for folder in _subfolders(root):
        if folder.name == masks.name:
            continue
        defect_type = folder.name
        label = int(defect_type != GOOD)
        for stem, path in _image_files(folder):
            mask = None
            if label:
                mask = _find_mask(
                    path.stem, [masks / defect_type, masks], ("{stem}.png", "{stem}_mask.png")
                )
            image_id = f"{category}/{defect_type}/{stem}"
            candidates.append(_Candidate(image_id, path, label, defect_type, category, mask))
    return candidates


def _is_groundtruth(path: Path) -> bool:
    return path.name.lower().endswith(GROUNDTRUTH_SUFFIX)


def _large_candidates(root: Path, category: str | None) -> list[_Candidate]:
    category_dirs = _category_folders(
        root, category, "category found: expected <category>/train/ or train/"
    )
    mask_names = (f"{{stem}}_{GROUNDTRUTH_SUFFIX}", f"{{stem}}{GROUNDTRUTH_SUFFIX}")
    candidates = []
    for name, folder in category_dirs:
        annotation = folder / ANNOTATION_FILE
        annotation_path = annotation if annotation.is_file() else None
        for split in ("train", "test"):
            split_folder = folder / split
            if not split_folder.is_dir():
                continue
            for stem, path in _image_files(split_folder):
                if _is_groundtruth(path):  # a mask, not an image
                    continue
                image_id = f"{name}/{split}/{stem}"
                if split == "train":
                    candidates.append(
                        _Candidate(image_id, path, 0, GOOD, name, split="train",
                                   annotation_path=annotation_path)
                    )
                    continue
                mask = _find_mask(path.stem, [split_folder], mask_names)
                if mask is None:
                    raise DefectflowError(
                        "test image has no ground-truth mask (expected "
                        f"{mask_names[0].format(stem=path.stem)} or "
                        f"{mask_names[1].format(stem=path.stem)} beside it)",
                        path,
                    )
                candidates.append(
                    _Candidate(image_id, path, 0, GOOD, name, mask, split="test",
                               annotation_path=annotation_path, label_from_mask=True)
                )
    return candidates


BSDATA_DEFECT = "pitting"
BSDATA_CATEGORY = "bsdata"


def _bsdata_candidates(
    root: Path, category: str | None, mask_folder: Path, train_fraction: float, seed: int
) -> list[_Candidate]:
    """BSData: ``data/*.jpg``; an image with a ``label/<stem>.json`` (LabelMe) is defective.

    Split. The pipeline fits on good images only, so every defective image is
    "test", including those the authors' ``image_data.json`` puts in "train"
    (it splits for supervised segmentation). Good images follow the authors'
    split when the file gives every good image "train" or "test"; otherwise
    (the published file gives good images no split) a seeded ``train_fraction``
    of them is "train" and the rest "test". The authors' split is kept in the
    ``authors_split`` column. Only the top level of ``data/`` is read (the
    published ``data/BSD/test/`` repeats one image).
    """
    data = root / "data"
    if not data.is_dir():
        raise DefectflowError(
            "no data/ folder (the bsdata layout expects data/*.jpg, label/<stem>.json and "
            "image_data.json)",
            root,
        )
    category = category or BSDATA_CATEGORY
    labels = root / "label"
    authors = _bsdata_authors_split(root / "image_data.json")
    images = _image_files(data)

    def materialize_mask(image: tuple[str, Path]) -> Path | None:
        path = image[1]
        label_file = labels / f"{path.stem}.json"
        if not label_file.is_file():
            return None
        size = _image_size(path)
        if size is None:  # unreadable: the scan skips it, its label does not matter
            return None
        mask = labelme_mask(label_file, *size)
        if not mask.any():  # a label file without shapes marks no defect
            return None
        mask_path = mask_folder / f"{path.stem}.png"
        _write_png_once(mask_path, mask.astype(np.uint8) * 255)
        return mask_path

    masks = _map_in_threads(materialize_mask, images)
    good_names = [path.name for (_, path), mask in zip(images, masks) if mask is None]
    authors_split_good = all(authors.get(name) in ("train", "test") for name in good_names)

    candidates = []
    for (stem, path), mask in zip(images, masks):
        authors_split = authors.get(path.name)
        extra = {"authors_split": authors_split}
        if mask is not None:
            candidates.append(
                _Candidate(f"{category}/{BSDATA_DEFECT}/{stem}", path, 1, BSDATA_DEFECT,
                           category, mask, split="test", extra=extra)
            )
        else:
            split = authors_split if authors_split_good else None  # None: drawn later
            candidates.append(
                _Candidate(f"{category}/{GOOD}/{stem}", path, 0, GOOD, category, split=split,
                           extra=extra)
            )
    return candidates


def _image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file header, or None when the image cannot be read."""
    from PIL import Image  # a dependency of matplotlib and scikit-image; reads headers only

    try:
        with Image.open(path) as image:
            return int(image.width), int(image.height)
    except Exception:  # noqa: BLE001 - any failure: try a full decode
        try:
            width, height, _ = image_header(path)
            return width, height
        except (DefectflowError, OSError):
            return None


def _bsdata_authors_split(path: Path) -> dict[str, str | None]:
    """Image file name -> the authors' "train"/"test" (or None) from ``image_data.json``.

    ``{}`` when the file is absent; a warning and ``{}`` when it cannot be used.
    """
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        split = {}
        for entry in data["images"]:
            value = entry.get("train_test_split")
            if value not in ("train", "test", None):
                raise ValueError(f"train_test_split {value!r}")
            split[str(entry["filename"])] = value
        return split
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        warnings.warn(f"{path}: ignoring the authors' split ({error})", UserWarning, stacklevel=4)
        return {}


def _elpv_candidates(root: Path, category: str | None) -> list[_Candidate]:
    # Imported here: it loads all 2,624 cells (~240 MB) and only this layout needs it.
    from elpv_dataset.utils import load_dataset

    images, probabilities, types = load_dataset()
    types = [str(kind) for kind in types]
    if category is not None and category not in types:
        raise DefectflowError(
            f"ELPV has no category {category!r}; categories: {', '.join(sorted(set(types)))}"
        )

    candidates, writes = [], []
    for index, (image, probability, kind) in enumerate(zip(images, probabilities, types)):
        if category is not None and kind != category:
            continue
        stem = f"{index:04d}"  # the cell's row in the package's labels.csv: stable
        path = root / kind / f"{stem}.png"
        writes.append((path, image))
        probability = float(probability)
        defect_type = GOOD if probability == 0 else f"p{probability:.2f}"
        candidates.append(
            _Candidate(
                f"{kind}/{defect_type}/{stem}",
                path,
                int(probability > 0),
                defect_type,
                kind,
                extra={"defect_probability": probability},
            )
        )
    _map_in_threads(lambda write: _write_png_once(*write), writes)
    return candidates


def _write_png_once(path: Path, image: np.ndarray) -> None:
    """Write ``image`` (gray or RGB) as PNG unless the file already holds these pixels.

    Pixels, not bytes, are compared: another OpenCV build may encode the same
    pixels differently, and rewriting would change the file's content hash.
    """
    # OpenCV reads and writes colour as BGR.
    pixels = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if path.is_file():
        existing = cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        if existing is not None and np.array_equal(existing, pixels):
            return
    ok, encoded = cv2.imencode(".png", pixels)
    if not ok:
        raise DefectflowError("cannot encode image as PNG", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so an interrupted run never leaves a truncated PNG behind.
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_bytes(encoded.tobytes())
    os.replace(partial, path)


# --------------------------------------------------------------------------- splits and tables


def _require_columns(manifest: pd.DataFrame, columns: tuple[str, ...]) -> None:
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
    _require_columns(manifest, ("image_id", "split", "label", "category"))
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
    _require_columns(manifest, ("category", "split", "defect_type"))
    keys = ["category", "split", "defect_type"]
    counts = manifest.groupby(keys).size().rename("n_images").reset_index()
    counts["n_images"] = counts["n_images"].astype("int64")
    counts["_split_order"] = counts["split"].map(_SPLIT_ORDER).fillna(len(_SPLIT_ORDER))
    counts["_not_good"] = counts["defect_type"] != GOOD
    counts = counts.sort_values(
        ["category", "_split_order", "split", "_not_good", "defect_type"], kind="stable"
    )
    return counts.drop(columns=["_split_order", "_not_good"]).reset_index(drop=True)


# --------------------------------------------------------------------------- image properties

_PROPERTY_COLUMNS = ("brightness", "colourfulness", "edge_density")

# Fixed Canny thresholds, so edge densities compare across images and datasets.
_CANNY_LOW, _CANNY_HIGH = 100, 200

# Silhouette costs O(n^2); above this many images it is estimated on a sample.
_SILHOUETTE_SAMPLE = 2000


def image_properties(image: np.ndarray) -> tuple[float, float, float]:
    """(brightness, colourfulness, edge_density) of an RGB uint8 image.

    brightness: mean gray level, 0-255. colourfulness: the Hasler–Süsstrunk
    metric (0 for gray images). edge_density: share of pixels that Canny
    (thresholds 100/200) marks as edges.
    """
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    red, green, blue = (image[:, :, channel].astype(np.float64) for channel in range(3))
    red_green = red - green
    yellow_blue = 0.5 * (red + green) - blue
    colourfulness = math.hypot(red_green.std(), yellow_blue.std()) + 0.3 * math.hypot(
        red_green.mean(), yellow_blue.mean()
    )
    edges = cv2.Canny(gray, _CANNY_LOW, _CANNY_HIGH)
    return float(gray.mean()), float(colourfulness), float(np.count_nonzero(edges) / edges.size)


def _downscale(image: np.ndarray, max_side: int) -> np.ndarray:
    height, width = image.shape[:2]
    if max(height, width) <= max_side:
        return image
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def property_table(
    manifest: pd.DataFrame, n_clusters: int | None = None, seed: int = 0, max_side: int = 256
) -> pd.DataFrame:
    """Per image: brightness, colourfulness, edge density, and a cluster of images alike in these.

    Images are first downscaled to at most ``max_side`` pixels a side (edge
    density therefore describes the image at that scale). The clusters come
    from KMeans (scikit-learn, ``n_init=10``, seeded) on the standardized
    properties, over all rows of ``manifest`` (pass one category's rows to
    cluster a category alone). They are numbered by mean brightness, darkest
    first, so the numbering does not depend on KMeans' arbitrary labels.

    ``n_clusters`` None picks k in 2..6 by the best silhouette score, trying
    only k with at least two distinct images per cluster; with fewer than
    four distinct images every image is in cluster 0.

    Returns columns ``image_id, category, brightness, colourfulness,
    edge_density, property_cluster`` in the manifest's row order.
    """
    _require_columns(manifest, ("image_id", "category", "path"))
    if n_clusters is not None and n_clusters < 1:
        raise DefectflowError(f"n_clusters must be at least 1, got {n_clusters}")

    def properties_of(path: str) -> tuple[float, float, float]:
        return image_properties(_downscale(read_image(path), max_side))

    features = np.array(_map_in_threads(properties_of, manifest["path"]), dtype=np.float64)
    features = features.reshape(-1, len(_PROPERTY_COLUMNS))  # keeps the shape when empty
    table = pd.DataFrame(
        {"image_id": manifest["image_id"].to_numpy(), "category": manifest["category"].to_numpy()}
    )
    table[list(_PROPERTY_COLUMNS)] = features
    table["property_cluster"] = _property_clusters(features, n_clusters, seed)
    return table


def _property_clusters(features: np.ndarray, n_clusters: int | None, seed: int) -> np.ndarray:
    """KMeans cluster of each row of ``features`` (see :func:`property_table`)."""
    # Imported here: scikit-learn is slow to import and scanning never needs it.
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score
    from sklearn.preprocessing import StandardScaler

    if len(features) == 0:
        return np.zeros(0, dtype=np.int64)
    scaled = StandardScaler().fit_transform(features)
    # KMeans cannot make more clusters than there are distinct points.
    n_distinct = len(np.unique(scaled.round(12), axis=0))

    def fit(k: int) -> np.ndarray:
        return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(scaled)

    if n_clusters is None:
        best_score, labels = -np.inf, np.zeros(len(features), dtype=np.int64)
        for k in range(2, min(6, n_distinct // 2) + 1):
            candidate = fit(k)
            sample = _SILHOUETTE_SAMPLE if len(features) > _SILHOUETTE_SAMPLE else None
            score = silhouette_score(scaled, candidate, sample_size=sample, random_state=seed)
            if score > best_score:
                best_score, labels = score, candidate
    elif n_clusters == 1:
        labels = np.zeros(len(features), dtype=np.int64)
    elif n_clusters > n_distinct:
        raise DefectflowError(f"n_clusters={n_clusters} exceeds the {n_distinct} distinct images")
    else:
        labels = fit(n_clusters)

    # Renumber by mean brightness (column 0), darkest first: a stable, readable numbering.
    clusters = np.unique(labels)
    order = sorted(clusters, key=lambda cluster: features[labels == cluster, 0].mean())
    renumber = {int(cluster): rank for rank, cluster in enumerate(order)}
    return np.array([renumber[int(label)] for label in labels], dtype=np.int64)
