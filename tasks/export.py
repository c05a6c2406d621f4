"""Writing a scanned dataset out in the MVTec AD folder layout.

Other tools (anomalib's ``MVTecAD`` data module, most papers' code) read only
MVTec AD's layout, and anomalib only ``.png`` files. ``export_mvtec`` writes
any manifest's train/test split as::

    <out>/<category>/train/good/<stem>.png
    <out>/<category>/test/<defect_type>/<stem>.png
    <out>/<category>/ground_truth/<defect_type>/<stem>_mask.png   (0/255)

so both tools see exactly the same pixels and the same split. JPEG images are
decoded once and stored losslessly as PNG; PNG images are copied byte for
byte. The folder is written beside its final place and renamed into it when
complete, under a name that hashes the exported rows, so a rerun with the same
manifest reuses it and an interrupted export never looks finished.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from .datasets import GOOD
from .cache import written_folder
from .errors import DefectflowError
from .images import read_image, read_mask, text_hash

EXPORT_VERSION = "mvtec-export-v1"


def limit_manifest(manifest: pd.DataFrame, max_train: int, max_test_per_type: int,
                   seed: int = 0) -> pd.DataFrame:
    """A seeded subset: at most ``max_train`` train images and ``max_test_per_type``
    test images of every defect type (good included), for short benchmark runs."""
    rng = np.random.default_rng(seed)
    keep = []
    train = np.flatnonzero((manifest["split"] == "train").to_numpy())
    keep.extend(rng.permutation(train)[:max_train])
    test = manifest[manifest["split"] == "test"]
    for _, rows in test.groupby("defect_type", sort=True):
        keep.extend(rng.permutation(rows.index.to_numpy())[:max_test_per_type])
    return manifest.loc[sorted(keep)].reset_index(drop=True)


def export_mvtec(manifest: pd.DataFrame, out_dir: str | Path, category: str) -> Path:
    """The category folder ``<out_dir>/<category>-<hash>/<category>`` in MVTec AD layout.

    ``manifest`` rows with split ``train`` must be good images; rows with
    split ``test`` go to ``test/<defect_type>``; other splits (a held-out
    ``val``) are left out. Defective test images need a mask.
    """
    rows = manifest[manifest["split"].isin(["train", "test"])]
    if not (rows["split"] == "train").any():
        raise DefectflowError("no train images to export", out_dir)
    bad_train = rows[(rows["split"] == "train") & (rows["label"] != 0)]
    if len(bad_train):
        raise DefectflowError(f"train image is not good (label {bad_train['label'].iloc[0]})",
                              bad_train["path"].iloc[0])
    no_mask = rows[(rows["split"] == "test") & (rows["label"] != 0)
                   & ~rows["mask_path"].map(lambda p: isinstance(p, str) and bool(p))]
    if len(no_mask):
        raise DefectflowError("defective test image has no mask (MVTec AD needs one)",
                              no_mask["path"].iloc[0])

    plan = [(row, _target(row)) for row in rows.itertuples(index=False)]
    targets = [target for _, target in plan]
    if len(set(targets)) != len(targets):
        duplicate = next(t for t in targets if targets.count(t) > 1)
        raise DefectflowError(f"two images would be exported to {duplicate}", out_dir)

    key = text_hash(EXPORT_VERSION, category,
                    *(f"{row.content_hash}:{target}" for row, target in plan))[:12]
    root = Path(out_dir) / f"{category}-{key}"
    with written_folder(root) as out:
        if out.missing:
            _write_export(out.partial / category, plan)
            counts = rows.groupby(["split", "defect_type"]).size()
            (out.partial / "export.json").write_text(json.dumps(
                {"version": EXPORT_VERSION, "category": category, "key": key,
                 "counts": {f"{s}/{d}": int(n) for (s, d), n in counts.items()}}, indent=1))
    return root / category


def _write_export(folder: Path, plan: list) -> None:
    """The images (PNG) and the defective test images' masks (0/255) under ``folder``."""
    for row, target in plan:
        image_path = folder / target
        image_path.parent.mkdir(parents=True, exist_ok=True)
        if Path(row.path).suffix.lower() == ".png":
            shutil.copyfile(row.path, image_path)
        else:
            # read_image returns RGB; OpenCV writes BGR.
            cv2.imwrite(str(image_path), cv2.cvtColor(read_image(row.path), cv2.COLOR_RGB2BGR))
        if row.split == "test" and row.label != 0:
            mask_path = (folder / "ground_truth" / row.defect_type
                         / f"{Path(target).stem}_mask.png")
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            mask = read_mask(row.mask_path, expected_hw=(int(row.height), int(row.width)))
            cv2.imwrite(str(mask_path), mask.astype(np.uint8) * 255)


def _target(row) -> str:
    """The image's path inside the category folder."""
    stem = str(row.image_id).rsplit("/", 1)[-1]
    if row.split == "train":
        return f"train/{GOOD}/{stem}.png"
    return f"test/{row.defect_type}/{stem}.png"
