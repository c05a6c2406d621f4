"""Per-category, per-channel normalization statistics (thesis 3.2.2 and 5.2)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .errors import DefectflowError
from .patches import iter_patch_pixels

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def channel_stats(patch_table: pd.DataFrame, paths: dict[str, str],
                  splits: tuple[str, ...] = ("train",),
                  denoise: dict | None = None) -> dict[str, list[float]]:
    """Mean and std of each RGB channel (0-1 scale) over every pixel of the training patches.

    Accumulated as float64 sums, so memory stays constant whatever the number of patches.
    """
    rows = patch_table[patch_table["split"].isin(splits)]
    if rows.empty:
        raise DefectflowError(f"no patches in split(s) {list(splits)} to compute normalization from")
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for _, crop in iter_patch_pixels(rows, paths, denoise):
        pixels = crop.reshape(-1, 3).astype(np.float64) / 255.0
        total += pixels.sum(axis=0)
        total_sq += np.square(pixels).sum(axis=0)
        count += pixels.shape[0]
    mean = total / count
    # Floor the std: a constant channel would otherwise divide by zero.
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    std = np.maximum(std, 1e-3)
    return {"mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in std]}


def normalization_stats(patch_table: pd.DataFrame, paths: dict[str, str],
                        mode: str = "dataset", denoise: dict | None = None
                        ) -> dict[str, list[float]]:
    """``dataset``: statistics of this category's training patches (thesis); ``imagenet``: the backbone's."""
    if mode == "imagenet":
        return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    if mode == "dataset":
        return channel_stats(patch_table, paths, denoise=denoise)
    raise DefectflowError(f"unknown normalization mode {mode!r} (choose 'dataset' or 'imagenet')")
