"""The ``magnetic_tile`` layout: Magnetic Tile Defects.

``MT_<Defect>/Imgs/<stem>.jpg`` with a same-stem ``.png`` mask; ``MT_Free``
holds the good images. The category recorded is ``category``, by default
"magnetic_tile". Every image keeps its mask (MT_Free's are all black).
"""

from __future__ import annotations

from pathlib import Path

from ...errors import DefectflowError
from ...images import IMAGE_SUFFIXES
from ..candidates import GOOD, MASK_SUFFIX, Candidate, ScanOptions
from ..files import find_mask, image_files, subfolders


def find_candidates(root: Path, options: ScanOptions) -> list[Candidate]:
    defect_folders = [path for path in subfolders(root) if path.name.startswith("MT_")]
    if not defect_folders:
        raise DefectflowError(
            "no MT_* folders found (the magnetic_tile layout expects MT_*/Imgs/*.jpg)", root
        )
    category = options.category or "magnetic_tile"
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
        for stem, path in image_files(images, image_suffixes):
            mask = find_mask(path.stem, [images], ("{stem}.png",))
            image_id = f"{category}/{defect_type}/{stem}"
            candidates.append(Candidate(image_id, path, label, defect_type, category, mask))
    return candidates
