"""The ``folder`` layout: a generic folder.

``good/*`` and one folder of images per defect type, masks optionally in
``masks/<defect_type>/`` or ``masks/`` (``<stem>.png`` or ``<stem>_mask.png``).
The category recorded is ``category``, by default the root folder's name.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import DefectflowError
from ..candidates import GOOD, Candidate, ScanOptions
from ..files import find_mask, image_files, subfolders


def find_candidates(root: Path, options: ScanOptions) -> list[Candidate]:
    if not (root / GOOD).is_dir():
        raise DefectflowError(
            "no good/ folder (the folder layout expects good/ and one folder per defect type)", root
        )
    category = options.category or root.name
    masks = root / "masks"
    candidates = []
    for folder in subfolders(root):
        if folder.name == masks.name:
            continue
        defect_type = folder.name
        label = int(defect_type != GOOD)
        for stem, path in image_files(folder):
            mask = None
            if label:
                mask = find_mask(
                    path.stem, [masks / defect_type, masks], ("{stem}.png", "{stem}_mask.png")
                )
            image_id = f"{category}/{defect_type}/{stem}"
            candidates.append(Candidate(image_id, path, label, defect_type, category, mask))
    return candidates
