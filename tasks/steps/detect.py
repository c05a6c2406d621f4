"""Steps 5-6: train a detector, score the validation and test patches."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from ..cache import Ref, allocated_memmap, cached_folder
from ..errors import DefectflowError
from ..feature_settings import FeatureSettings
from ..feature_sources import carried_files
from ..features import FeatureStoreRef
from ..methods import METHODS, PatchSet, source_hash
from ..scoring import patch_set, score_pieces
from .common import category_rows, image_paths, step_key


def labelled_defects(manifest: pd.DataFrame, category: str, count: int, seed: int) -> list[str]:
    """Image ids of ``count`` defective test images of a category (seeded), for methods that
    train on a few labelled defects; they are then never scored in those methods' evaluation.
    At most half of the category's defective test images are taken, so some remain to test."""
    defective = manifest[(manifest["category"] == category) & (manifest["split"] == "test")
                         & (manifest["label"] == 1)]["image_id"].sort_values().to_numpy()
    count = min(count, len(defective) // 2)
    if count <= 0:
        return []
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(defective, size=count, replace=False).tolist())


# -- 5. train, 6. score ------------------------------------------------------------
def train_step(store: FeatureStoreRef | None, patches: Ref, manifest: Ref, category: str,
               method: str, method_params, features: FeatureSettings, stats: dict,
               cache_dir: str, method_source: str | None = None) -> Ref:
    """Fit one detector on the category's training patches and save it.

    ``method_params`` is the method's parameter object as the params validator built it
    (``PipelineParams.methods``); the detector receives that very object.

    A method that needs labelled defects also gets the patches of a few
    defective test images (listed in ``train_defects.json`` beside the model).
    The key includes ``method_source``, the hash of the method's code
    (``methods.source_hash``, computed when not given; the flow passes it so
    that Prefect's input-keyed cache sees it too): changed code retrains.

    ``store`` None trains a method that reads pixels only (CutPaste, whose encoder a
    feature source reads) before any features exist: its key then holds what decides its
    input pixels instead of the store's key.
    """
    method_source = method_source or source_hash(method)
    inputs = (store.key if store is not None else
              ("pixels", patches.key, features.input_size,
               json.dumps({k: stats.get(k) for k in ("mean", "std", "denoise")}, sort_keys=True)))
    key = step_key("train", inputs, category, method,
                   json.dumps(dataclasses.asdict(method_params), sort_keys=True), method_source)
    with cached_folder(cache_dir, "models", key) as out:
        if out.missing:
            rows = category_rows(patches, category)
            detector_cls = METHODS[method]
            detector = detector_cls(method_params)
            selected = (rows["split"] == "train").to_numpy()
            defects: list[str] = []
            if detector_cls.needs_labelled_defects:
                defects = labelled_defects(manifest.table(), category,
                                           getattr(method_params, "n_defective", 0),
                                           getattr(method_params, "seed", 0))
                selected = selected | rows["image_id"].isin(defects).to_numpy()
            train = patch_set(store, rows, selected, image_paths(manifest), features, stats)
            if not (train.table["split"] == "train").any():
                raise DefectflowError(f"category {category!r} has no training images")
            detector.fit(train)
            detector.save(out.partial)
            # Combined features: new images need the transform (and a trained encoder).
            for carried in carried_files(store) if store is not None else ():
                shutil.copy2(carried, out.partial / carried.name)
            (out.partial / "train_defects.json").write_text(json.dumps(defects))
    return out.ref


def score_step(model: Ref, store: FeatureStoreRef, patches: Ref, manifest: Ref,
               category: str, method: str, features: FeatureSettings, stats: dict,
               cache_dir: str) -> Ref:
    """Scores and anomaly maps (float16) of the category's validation and test patches,
    leaving out any image the detector trained on."""
    key = step_key("score", model.key, store.key, category)
    with cached_folder(cache_dir, "scores", key) as out:
        if out.missing:
            rows = category_rows(patches, category)
            trained_on = json.loads((Path(model.path) / "train_defects.json").read_text())
            selected = (rows["split"].isin(["val", "test"])
                        & ~rows["image_id"].isin(trained_on)).to_numpy()
            batch = patch_set(store, rows, selected, image_paths(manifest), features, stats)
            score_into(METHODS[method].load(model.path), batch, out.partial)
    return out.ref


def score_into(detector, batch: PatchSet, folder: Path) -> None:
    """Score ``batch`` and write ``scores.parquet`` + ``anomaly_maps.npy`` (float16) into
    ``folder``; real and synthetic images go through this one path."""
    # Streamed to disk: memory stays bounded for any number of patches.
    size = batch.input_size
    maps = allocated_memmap(folder / "anomaly_maps.npy", np.float16, (len(batch), size, size))
    scores = score_pieces(detector, batch, maps)
    maps.flush()
    del maps
    table = batch.table.copy()
    table["score"] = scores
    table.to_parquet(folder / "scores.parquet", index=False)
