"""What a layout reader hands to the scan: candidate images, and the options it may read.

A layout reader (``layouts/<layout>.py``) lists the image files of its folder
layout as :class:`Candidate` objects, before any file is opened; the scan
(``manifest.py``) then opens them and builds the manifest rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

GOOD = "good"
MASK_SUFFIX = ".png"
DEFECT = "defect"  # the defect type of a label_from_mask candidate whose mask is not empty


@dataclass
class Candidate:
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


@dataclass(frozen=True)
class ScanOptions:
    """The scan's arguments a layout reader may need besides its folder (see ``scan_dataset``)."""

    category: str | None
    train_fraction: float
    seed: int
    materialize_dir: Path  # resolved: where readers write images or masks they derive
