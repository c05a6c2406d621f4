"""Turning patches into a detector's input and scoring it piece by piece: the low-level
scoring shared by the pipeline's steps and by serving (new images, synthetic defects)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from . import cores
from .feature_settings import FeatureSettings
from .errors import DefectflowError
from .feature_sources import feature_store
from .feature_transform import TRANSFORM_NAME
from .features import FeatureStoreRef, resolve_device
from .methods import PatchSet
from .methods.cutpaste_encoder import ENCODER_FILE

# Patches scored per call. It bounds the anomaly maps and features held in memory, and keeps
# each call's arrays small enough (tens of MB at 224 px) for the allocator to reuse them: with
# 512, every call took hundreds of MB of fresh pages, whose first touches cost more than the
# search itself on this project's 2-core VMs. The registered Magnetic Tile PatchCore (ivf)
# spent 11.0 ms per image in score_pieces with 512, 7.0 with 64 (/work/exp/ov10/py_parts.py).
SCORE_PIECE = 64


def patch_set(store: FeatureStoreRef | None, rows: pd.DataFrame, selected: np.ndarray,
              paths: dict[str, str], features: FeatureSettings, stats: dict) -> PatchSet:
    """The rows of ``rows`` where ``selected`` is True, as a detector's input (``paths``:
    image id -> file; ``features``: input size and device; ``stats``: normalization mean,
    std and denoising)."""
    positions = np.flatnonzero(selected)
    return PatchSet(rows.iloc[positions].reset_index(drop=True), store, positions,
                    paths, features.input_size, tuple(stats["mean"]), tuple(stats["std"]),
                    device=resolve_device(features.device), denoise=stats.get("denoise"))


def score_pieces(detector, batch: PatchSet, maps: np.ndarray) -> np.ndarray:
    """Patch scores of ``batch``, its anomaly maps written into ``maps`` (float16, as the
    pipeline stores them), ``SCORE_PIECE`` patches per call: memory stays bounded."""
    scores = np.zeros(len(batch), dtype=np.float32)
    for start in range(0, len(batch), SCORE_PIECE):
        cores.follow()  # the current share of the cores, when steps run side by side
        part = slice(start, min(start + SCORE_PIECE, len(batch)))
        scores[part], piece_maps = detector.score(batch.subset(part))
        maps[part] = piece_maps  # cast to float16 on assignment, without a copy
    return scores


def new_images_batch(manifest: pd.DataFrame, patches: pd.DataFrame, features: FeatureSettings,
                     stats: dict, cache_dir: str | Path, with_features: bool = True,
                     model_dir: str | Path | None = None) -> PatchSet:
    """Every patch of images from outside the scanned dataset (synthetic defects, an inbox)
    as a detector's input, prepared exactly as the dataset's own: the same backbone, layers,
    input size, normalization and denoising, into a content-addressed feature store under
    ``cache_dir`` (skipped for methods that read pixels only: ``with_features=False``).
    Combined (multi-network) features need what the detector's folder ``model_dir``
    carries: the feature transform it was trained with, and the encoder file of a source
    reading CutPaste's encoder."""
    store = None
    if with_features:
        transform = _carried(model_dir, TRANSFORM_NAME)
        if features.combined and transform is None:
            raise DefectflowError("this detector reads combined features (features.sources) "
                                  "but its folder has no feature transform")
        store = feature_store(patches, manifest, features, mean=stats["mean"],
                              std=stats["std"], cache_dir=cache_dir, progress=False,
                              denoise=stats.get("denoise"), transform=transform,
                              encoder=_carried(model_dir, ENCODER_FILE))
    return patch_set(store, patches, np.ones(len(patches), bool),
                     dict(zip(manifest["image_id"], manifest["path"])), features, stats)


def _carried(model_dir: str | Path | None, name: str) -> Path | None:
    """The file ``name`` a trained detector's folder carries (``feature_sources.carried_files``
    put it there), None without one."""
    path = None if model_dir is None else Path(model_dir) / name
    return path if path is not None and path.is_file() else None
