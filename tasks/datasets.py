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
``elpv``
    The ELPV solar-cell images shipped by the ``elpv-dataset`` package,
    written once as PNG files under ``materialize_dir``.
``magnetic_tile``
    Magnetic Tile Defects: ``MT_<Defect>/Imgs/<stem>.jpg`` with a same-stem
    ``.png`` mask; ``MT_Free`` holds the good images.
``folder``
    A generic folder: ``good/*`` and one folder of images per defect type,
    masks optionally in ``masks/<defect_type>/`` or ``masks/``.

Outside MVTec AD the split is drawn: a seeded ``train_fraction`` of each
category's good images is "train", the rest of the good images and all
defective images are "test".
"""

from __future__ import annotations

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

from .errors import DefectflowError
from .images import IMAGE_SUFFIXES, file_hash, image_header, read_image, read_mask, text_hash

LAYOUTS = ("mvtec", "elpv", "magnetic_tile", "folder")

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
)

T = TypeVar("T")
R = TypeVar("R")

GOOD = "good"
MASK_SUFFIX = ".png"

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
            for ``mvtec``, whose folders give the split.
        seed: seed of the train/test draw (an integer >= 0). The same files
            and seed give the same manifest; each category is drawn from its
            own generator, so adding a category does not reshuffle another.
        materialize_dir: where ``elpv`` writes its images as PNG files,
            under ``elpv/<category>/<index>.png``. A file already holding
            the same pixels is left alone, so its content hash stays stable.

    Returns:
        A :class:`ScanResult`. The manifest columns are ``MANIFEST_COLUMNS``
        (``elpv`` adds ``defect_probability``). Masks are looked up for
        defective images only, except for ``magnetic_tile``, which keeps
        the mask of every image that has one (MT_Free's are all black).

    Corrupt or unreadable image files are *skipped*: each one raises a
    ``UserWarning`` naming the file and is listed in ``ScanResult.skipped``
    with the reason, so one bad file does not stop a scan of thousands.

    Raises:
        DefectflowError: naming the path, when the source folder is missing,
            the layout is unknown, the layout's expected folders are absent,
            no usable image is left, a mask cannot be read, or a mask's size
            differs from its image's (checked here, so it surfaces early).
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
        }
        candidates = readers[layout](root, category)

    rows, skipped = _read_candidates(candidates)
    if not rows:
        raise DefectflowError(f"no usable images found for the {layout!r} layout", root)
    _draw_train_split(rows, train_fraction, seed)

    extra_columns = sorted({key for row in rows for key in row} - set(MANIFEST_COLUMNS))
    manifest = pd.DataFrame(rows, columns=[*MANIFEST_COLUMNS, *extra_columns])
    integer_columns = ("label", "width", "height", "channels")
    manifest = manifest.astype({column: "int64" for column in integer_columns})
    # Object dtype keeps missing masks as None (pandas' string dtype would turn them into NaN).
    manifest["mask_path"] = pd.Series([row["mask_path"] for row in rows], dtype=object)
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
    if candidate.mask_path is not None:
        read_mask(candidate.mask_path, expected_hw=(height, width))  # raises, naming the mask file
    row = {
        "image_id": candidate.image_id,
        "path": str(candidate.path),
        "split": candidate.split,
        "label": candidate.label,
        "defect_type": candidate.defect_type,
        "mask_path": None if candidate.mask_path is None else str(candidate.mask_path),
        "category": candidate.category,
        "width": width,
        "height": height,
        "channels": channels,
        "content_hash": file_hash(candidate.path),
        **candidate.extra,
    }
    return row, None


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


def _mvtec_candidates(root: Path, category: str | None) -> list[_Candidate]:
    if (root / "train").is_dir():  # one category folder
        category_dirs = [(category or root.name, root)]
    else:
        found = [path for path in _subfolders(root) if (path / "train").is_dir()]
        if not found:
            raise DefectflowError(
                "no MVTec AD category found: expected <category>/train/good/ "
                "or train/good/ in this folder",
                root,
            )
        if category is not None:
            found = [path for path in found if path.name == category]
            if not found:
                names = ", ".join(
                    path.name for path in _subfolders(root) if (path / "train").is_dir()
                )
                raise DefectflowError(
                    f"category {category!r} not found; categories here: {names}", root
                )
        category_dirs = [(path.name, path) for path in found]

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

    train_good = result[(result["split"] == "train") & (result["label"] == 0)]
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
