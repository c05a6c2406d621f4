"""Sliding-window patch planning (kitchen-board thesis, section 3.2.1).

Per axis the thesis places ``floor((L - P) / S) + 1`` windows at ``x = S * i``;
we add one more window flush with the right (bottom) edge whenever those leave
a strip uncovered, so the whole image is inspected. A whole image is the
special case of one patch (``patch_size=None``).

Large images may come with a thesis annotation file (section 3.2.3, see
``annotations.py``; the manifest's ``annotation_path``). For an image it
annotates, windows are laid out by the same grid inside each ``borders`` box
(the active area) instead of the whole image, and every window that
intersects a ``labels`` box is dropped. The thesis annotates test images;
here the same rule applies to any annotated image, whatever its split, so
that an annotated training image also keeps its background and printed
labels out of the memory bank. Unannotated images use the whole image.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from .annotations import ImageAnnotation, boxes_intersect, check_annotation, load_annotations
from .errors import DefectflowError
from .images import read_image, read_mask

PATCH_COLUMNS = ["patch_id", "image_id", "category", "split", "x", "y", "width", "height",
                 "label", "mean_intensity"]


def grid_positions(length: int, patch_size: int, stride: int) -> list[int]:
    """Top-left offsets of windows along one axis, the edge window included."""
    if patch_size <= 0 or stride <= 0:
        raise DefectflowError(f"patch size and stride must be positive (got {patch_size}, {stride})")
    if length <= patch_size:
        return [0]
    count = (length - patch_size) // stride + 1
    positions = [stride * i for i in range(count)]
    if positions[-1] + patch_size < length:
        positions.append(length - patch_size)
    return positions


def patch_windows(width: int, height: int, patch_size: int | None,
                  stride: int | None) -> list[tuple[int, int, int, int]]:
    """(x, y, w, h) of every window of an image; one window when ``patch_size`` is None."""
    if patch_size is None:
        return [(0, 0, width, height)]
    stride = stride or patch_size
    w, h = min(patch_size, width), min(patch_size, height)
    return [(x, y, w, h)
            for y in grid_positions(height, patch_size, stride)
            for x in grid_positions(width, patch_size, stride)]


def annotated_windows(annotation: ImageAnnotation, width: int, height: int,
                      patch_size: int | None,
                      stride: int | None) -> list[tuple[int, int, int, int]]:
    """(x, y, w, h) of the windows of an annotated image.

    The grid of :func:`patch_windows` is laid inside each ``borders`` box (the
    whole image when there are none), edge windows included, so the active
    area is covered; windows that intersect a ``labels`` box are dropped. With
    ``patch_size`` None each border box (or the whole image) is one window,
    and labels are not applied (they would leave the image without a window).
    """
    areas = annotation.borders or ((0, 0, width, height),)
    if patch_size is None:
        return list(dict.fromkeys(areas))
    windows: dict[tuple[int, int, int, int], None] = {}  # ordered, without repeats
    for bx, by, bw, bh in areas:
        for x, y, w, h in patch_windows(bw, bh, patch_size, stride):
            window = (bx + x, by + y, w, h)
            if not any(boxes_intersect(window, label) for label in annotation.labels):
                windows[window] = None
    return list(windows)


def _image_patches(row, patch_size, stride, min_mean_intensity,
                   annotation: ImageAnnotation | None = None) -> list[dict]:
    width, height = int(row.width), int(row.height)
    # A whole image is never filtered, so its pixels need not be read here.
    image = read_image(row.path) if patch_size is not None else None
    if image is not None and image.shape[:2] != (height, width):
        raise DefectflowError("image changed on disk since the scan (size differs)", row.path)
    mask = None
    if isinstance(row.mask_path, str) and row.mask_path:
        mask = read_mask(row.mask_path, expected_hw=(height, width))
    if annotation is None:
        windows = patch_windows(width, height, patch_size, stride)
    else:
        windows = annotated_windows(annotation, width, height, patch_size, stride)
        if not windows:
            raise DefectflowError(
                f"image {Path(row.path).name!r}: every {patch_size}px window inside its "
                "borders intersects a labels box; nothing is left to inspect",
                row.annotation_path,
            )
    records = []
    for x, y, w, h in windows:
        if mask is not None:
            label = int(mask[y:y + h, x:x + w].any())
        else:
            # Without a mask, a patch inherits its image's label.
            label = int(row.label)
        records.append(dict(image_id=row.image_id, category=row.category, split=row.split,
                            x=x, y=y, width=w, height=h, label=label,
                            mean_intensity=float("nan") if image is None
                            else float(image[y:y + h, x:x + w].mean())))
    if patch_size is not None:
        kept = [r for r in records if r["mean_intensity"] > min_mean_intensity]
        if not kept:
            # Keep the brightest window so that every image still gets a score.
            kept = [max(records, key=lambda r: r["mean_intensity"])]
        records = kept
    return records


def plan_patches(manifest: pd.DataFrame, patch_size: int | None = None,
                 stride: int | None = None, min_mean_intensity: float = 31.0, *,
                 use_annotations: bool = True) -> pd.DataFrame:
    """The patch table: one row per kept window of every manifest image.

    Windows whose mean intensity (0-255, over all channels) is at or below
    ``min_mean_intensity`` are dropped, as the thesis drops black background;
    whole images (``patch_size=None``) are never dropped. A patch's label is 1
    when its part of the mask has any positive pixel.

    When the manifest has an ``annotation_path`` column (and
    ``use_annotations``), an image with an entry in its annotation file gets
    the windows of :func:`annotated_windows`: inside its borders, none
    intersecting a label box. Each file is read once; its boxes are checked
    against the image's size (a DefectflowError names the file and image).
    Manifests without annotations give the same table as before.
    """
    records: list[dict] = []
    annotation_files: dict[str, dict[str, ImageAnnotation]] = {}
    for row in manifest.itertuples(index=False):
        annotation = None
        json_path = getattr(row, "annotation_path", None)
        if use_annotations and isinstance(json_path, str) and json_path:
            if json_path not in annotation_files:
                annotation_files[json_path] = load_annotations(json_path)
            name = Path(row.path).name
            annotation = annotation_files[json_path].get(name)
            if annotation is not None:
                check_annotation(annotation, int(row.width), int(row.height), json_path, name)
        records.extend(_image_patches(row, patch_size, stride, min_mean_intensity, annotation))
    table = pd.DataFrame.from_records(records, columns=PATCH_COLUMNS[1:])
    table.insert(0, "patch_id", [f"{r.image_id}@{r.x},{r.y},{r.width},{r.height}"
                                 for r in table.itertuples(index=False)])
    return table.reset_index(drop=True)


SQUASH_RATIO = 2.0  # a whole-image run warns about images more elongated than this


def squash_warning(manifest: pd.DataFrame, patch_size: int | None) -> str | None:
    """The warning for a whole-image run (``patch_size`` None) on elongated images: each
    image is resized to a square, so a 4096 x 256 image loses 16x of its width. None when
    patches are used or every image is within ``SQUASH_RATIO``:1."""
    if patch_size is not None or manifest.empty:
        return None
    sides = manifest[["width", "height"]].to_numpy(dtype=float)
    ratios = sides.max(axis=1) / np.maximum(sides.min(axis=1), 1)
    worst = int(np.argmax(ratios))
    if ratios[worst] <= SQUASH_RATIO:
        return None
    width, height = sides[worst].astype(int)
    side = int(min(width, height))
    return (f"{int((ratios > SQUASH_RATIO).sum())} images have an aspect ratio up to "
            f"{ratios[worst]:.1f}:1 (e.g. {manifest['image_id'].iloc[worst]}, {width}x{height}) "
            f"and are squashed to a square on a whole-image run; set patches.size (e.g. "
            f"--set patches.size={side}) to inspect them in square windows")


def warn_if_squashed(manifest, patch_size: int | None) -> None:
    """Warn once (a UserWarning) when ``squash_warning`` has something to say; ``manifest``
    is a DataFrame or a manifest Ref (``.table()``)."""
    table = manifest.table() if hasattr(manifest, "table") else manifest
    message = squash_warning(table, patch_size)
    if message:
        warnings.warn(message, UserWarning, stacklevel=2)


def denoise_image(image: np.ndarray, denoise: dict | None) -> np.ndarray:
    """OpenCV non-local-means denoising (the thesis's "blur" experiments), or the image as is.

    ``denoise``: ``{"h": 10, "template_window": 7, "search_window": 21}`` (OpenCV's
    ``h``/``hColor``, ``templateWindowSize``, ``searchWindowSize``), or None.
    """
    if not denoise:
        return image
    import cv2

    return cv2.fastNlMeansDenoisingColored(
        image, None, h=float(denoise["h"]), hColor=float(denoise["h"]),
        templateWindowSize=int(denoise["template_window"]),
        searchWindowSize=int(denoise["search_window"]))


def iter_patch_pixels(patch_table: pd.DataFrame, paths: dict[str, str],
                      denoise: dict | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(row position, RGB uint8 crop) for every patch, reading (and denoising) each image once."""
    positions = np.arange(len(patch_table))
    image_ids = patch_table["image_id"].to_numpy()
    current_id, image = None, None
    for pos in positions:
        if image_ids[pos] != current_id:
            current_id = image_ids[pos]
            image = denoise_image(read_image(paths[current_id]), denoise)
        x, y, w, h = (int(v) for v in patch_table.iloc[pos][["x", "y", "width", "height"]])
        yield int(pos), image[y:y + h, x:x + w]


def patch_mask(patch_row, mask_path: str | None, image_hw: tuple[int, int]) -> np.ndarray:
    """The ground-truth crop of one patch (all False where the image has no mask)."""
    if not mask_path:
        return np.zeros((int(patch_row.height), int(patch_row.width)), dtype=bool)
    mask = read_mask(mask_path, expected_hw=image_hw)
    x, y, w, h = int(patch_row.x), int(patch_row.y), int(patch_row.width), int(patch_row.height)
    return mask[y:y + h, x:x + w]
