"""The ``mvtec`` layout: MVTec AD.

``<category>/train/good/*``, ``<category>/test/<defect_type>/*``, masks in
``<category>/ground_truth/<defect_type>/<stem>_mask.png`` (or ``<stem>.png``).
The split comes from the folders. ``source`` is either one category folder
(it holds ``train/``) or a folder of category folders.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import DefectflowError
from ..candidates import GOOD, Candidate, ScanOptions
from ..files import category_folders, find_mask, image_files, subfolders


def find_candidates(root: Path, options: ScanOptions) -> list[Candidate]:
    category_dirs = category_folders(
        root,
        options.category,
        "MVTec AD category found: expected <category>/train/good/ or train/good/",
    )
    candidates = []
    for name, folder in category_dirs:
        train_good = folder / "train" / GOOD
        if not train_good.is_dir():
            raise DefectflowError("MVTec AD category has no train/good/ folder", folder)
        for stem, path in image_files(train_good):
            image_id = f"{name}/train/{GOOD}/{stem}"
            candidates.append(Candidate(image_id, path, 0, GOOD, name, split="train"))
        test = folder / "test"
        if not test.is_dir():
            continue
        for defect_folder in subfolders(test):
            defect_type = defect_folder.name
            label = int(defect_type != GOOD)
            mask_folder = folder / "ground_truth" / defect_type
            for stem, path in image_files(defect_folder):
                mask = None
                if label:
                    mask = find_mask(path.stem, [mask_folder], ("{stem}_mask.png", "{stem}.png"))
                # train/good and test/good reuse file names, so the split is part of the id.
                image_id = f"{name}/test/{defect_type}/{stem}"
                candidates.append(
                    Candidate(image_id, path, label, defect_type, name, mask, split="test")
                )
    return candidates
