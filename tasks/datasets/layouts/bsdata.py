"""The ``bsdata`` layout: BSData (ball-screw drive surfaces).

``data/*.jpg``, LabelMe polygons in ``label/<stem>.json``, the authors' split
in ``image_data.json``. Images with a label file are defective ("pitting");
their polygons are written once as PNG masks under
``materialize_dir/bsdata/masks/``. See :func:`find_candidates` for the split.
The manifest gets an ``authors_split`` column.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from PIL import Image  # a dependency of matplotlib and scikit-image; reads headers only

from ...annotations import labelme_mask
from ...errors import DefectflowError
from ...images import image_header
from ..candidates import GOOD, Candidate, ScanOptions
from ..files import image_files, map_in_threads, write_png_once

BSDATA_DEFECT = "pitting"
BSDATA_CATEGORY = "bsdata"


def find_candidates(root: Path, options: ScanOptions) -> list[Candidate]:
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
    category = options.category or BSDATA_CATEGORY
    labels = root / "label"
    mask_folder = options.materialize_dir / "bsdata" / "masks"
    authors = _bsdata_authors_split(root / "image_data.json")
    images = image_files(data)

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
        write_png_once(mask_path, mask.astype(np.uint8) * 255)
        return mask_path

    masks = map_in_threads(materialize_mask, images)
    good_names = [path.name for (_, path), mask in zip(images, masks) if mask is None]
    authors_split_good = all(authors.get(name) in ("train", "test") for name in good_names)

    candidates = []
    for (stem, path), mask in zip(images, masks):
        authors_split = authors.get(path.name)
        extra = {"authors_split": authors_split}
        if mask is not None:
            candidates.append(
                Candidate(f"{category}/{BSDATA_DEFECT}/{stem}", path, 1, BSDATA_DEFECT,
                          category, mask, split="test", extra=extra)
            )
        else:
            split = authors_split if authors_split_good else None  # None: drawn later
            candidates.append(
                Candidate(f"{category}/{GOOD}/{stem}", path, 0, GOOD, category, split=split,
                          extra=extra)
            )
    return candidates


def _image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file header, or None when the image cannot be read."""
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
        # stacklevel 4: the caller of scan_dataset.
        warnings.warn(f"{path}: ignoring the authors' split ({error})", UserWarning, stacklevel=4)
        return {}
