"""The ``large`` layout: large production images (kitchen-board thesis, section 3.2.3).

``<category>/train/*`` (good), ``<category>/test/*`` with a ground-truth mask
beside each test image, ``<stem>_groundtruth.png`` or ``<stem>groundtruth.png``
(a missing one is an error). A test image is defective (defect type
"defect") when its mask has any positive pixel, else "good". An optional
``<category>/annotations.json`` (thesis format, see ``annotations.py``) gives
active areas and excluded regions; its path is every row's
``annotation_path``. The split comes from the folders.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import DefectflowError
from ..candidates import GOOD, Candidate, ScanOptions
from ..files import category_folders, find_mask, image_files

GROUNDTRUTH_SUFFIX = "groundtruth.png"  # masks: <stem>[_]groundtruth.png
ANNOTATION_FILE = "annotations.json"


def _is_groundtruth(path: Path) -> bool:
    return path.name.lower().endswith(GROUNDTRUTH_SUFFIX)


def find_candidates(root: Path, options: ScanOptions) -> list[Candidate]:
    category_dirs = category_folders(
        root, options.category, "category found: expected <category>/train/ or train/"
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
            for stem, path in image_files(split_folder):
                if _is_groundtruth(path):  # a mask, not an image
                    continue
                image_id = f"{name}/{split}/{stem}"
                if split == "train":
                    candidates.append(
                        Candidate(image_id, path, 0, GOOD, name, split="train",
                                  annotation_path=annotation_path)
                    )
                    continue
                mask = find_mask(path.stem, [split_folder], mask_names)
                if mask is None:
                    raise DefectflowError(
                        "test image has no ground-truth mask (expected "
                        f"{mask_names[0].format(stem=path.stem)} or "
                        f"{mask_names[1].format(stem=path.stem)} beside it)",
                        path,
                    )
                candidates.append(
                    Candidate(image_id, path, 0, GOOD, name, mask, split="test",
                              annotation_path=annotation_path, label_from_mask=True)
                )
    return candidates
