"""Scoring new images with a fitted detector, exactly as the pipeline scored its test images.

A registered model (see ``tracking.register_detectors``) is a folder with two
things: the fitted detector (saved through ``Detector.save``) and
``scoring.json``, every setting that turns an image into the detector's input
(patch windows, denoising, normalization mean/std, backbone, layers, input
size) plus the decision threshold chosen on held-out good images.
:class:`ImageScorer` loads that folder and scores images through the
pipeline's own code: ``patches.plan_patches`` for the windows,
``features.extract_features`` for the backbone features (into a temporary
store), ``steps._patch_set`` for the detector's input and ``Detector.score``.
An image's score is the maximum over its patches, as in ``steps.image_scores``.

This module is plain Python: the MLflow pyfunc wrapper lives in ``tracking.py``.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from .errors import DefectflowError
from .images import file_hash, image_header

CONFIG_NAME = "scoring.json"
CONFIG_VERSION = 1

#: Methods whose ``score`` reads backbone features (``PatchSet.feature_chunks``); the others
#: (CutPaste, the classifier) run their own network on ``PatchSet.input_batches``.
FEATURE_METHODS = frozenset({"patchcore", "padim", "ensemble"})


@dataclasses.dataclass(frozen=True)
class ScoringConfig:
    """Everything besides the fitted detector that scoring a new image needs."""

    method: str
    dataset: str
    category: str
    backbone: str
    layers: tuple[str, ...]
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    threshold: float               # image-score threshold from held-out good images
    denoise: dict | None = None
    patch_size: int | None = None  # None: each whole image is one patch
    patch_stride: int | None = None
    min_mean_intensity: float = 31.0
    batch_size: int = 8
    device: str = "auto"
    map_vmax: float | None = None  # overlay colour scale: the evaluation's (0.99 quantile of peaks)
    version: int = CONFIG_VERSION

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ScoringConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DefectflowError(f"cannot read the scoring settings ({exc})", path) from None
        if data.get("version") != CONFIG_VERSION:
            raise DefectflowError(f"scoring settings version {data.get('version')!r} is not "
                                  f"{CONFIG_VERSION}", path)
        data["layers"] = tuple(data["layers"])
        data["mean"], data["std"] = tuple(data["mean"]), tuple(data["std"])
        return cls(**data)

    @property
    def stats(self) -> dict:
        """The normalization dict the pipeline's steps pass around (with its denoising)."""
        return {"mean": list(self.mean), "std": list(self.std), "denoise": self.denoise}


def config_from_pipeline(params, result: dict, threshold: float,
                         map_vmax: float | None = None) -> ScoringConfig:
    """The scoring settings of one pipeline result (a ``record_pipeline`` results entry)."""
    stats = result["normalization"]
    return ScoringConfig(
        method=result["method"], dataset=params.dataset_name, category=result["category"],
        backbone=params.features.backbone, layers=tuple(params.features.layers),
        input_size=int(params.features.input_size), mean=tuple(stats["mean"]),
        std=tuple(stats["std"]), threshold=float(threshold), denoise=stats.get("denoise"),
        patch_size=params.patches.size, patch_stride=params.patches.stride,
        min_mean_intensity=float(params.patches.min_mean_intensity),
        batch_size=int(params.features.batch_size), device=params.features.device,
        map_vmax=map_vmax)


def overlay_scale(scores_dir: str | Path, sample: int = 2000) -> float | None:
    """The evaluation's overlay colour scale: 0.99 quantile of the scored maps' peaks
    (read for at most ``sample`` evenly spaced maps, so large runs stay cheap)."""
    path = Path(scores_dir) / "anomaly_maps.npy"
    if not path.is_file():
        return None
    maps = np.load(path, mmap_mode="r")
    if not len(maps):
        return None
    rows = np.unique(np.linspace(0, len(maps) - 1, min(sample, len(maps))).astype(int))
    peaks = np.asarray(maps[rows], dtype=np.float32).max(axis=(1, 2))
    return float(np.quantile(peaks, 0.99))


class ImageScorer:
    """A fitted detector plus its scoring settings: ``score(images)`` -> scores and maps."""

    def __init__(self, detector_dir: str | Path, config: ScoringConfig):
        from .methods import METHODS

        if config.method not in METHODS:
            raise DefectflowError(f"unknown method {config.method!r} in the scoring settings")
        self.config = config
        self.detector = METHODS[config.method].load(detector_dir)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ImageScorer":
        """A folder holding ``detector/`` and ``scoring.json`` (what ``write_model_folder`` makes)."""
        folder = Path(folder)
        return cls(folder / "detector", ScoringConfig.load(folder / CONFIG_NAME))

    def score(self, images) -> pd.DataFrame:
        """Score images; one row per image, in input order.

        ``images``: a DataFrame with a ``path`` column, one path, a list of paths,
        or a list of RGB uint8 arrays (H, W, 3). Returns columns ``image`` (the
        path, or ``array-<i>``), ``score``, ``threshold``, ``verdict``
        (``defective`` when score > threshold, else ``good``) and ``anomaly_map``
        (float32 (H, W) at the image's resolution; NaN where no patch looked).
        An unreadable file raises DefectflowError naming it.
        """
        with tempfile.TemporaryDirectory(prefix="defectflow-score-") as tmp:
            paths, names = _image_files(images, Path(tmp))
            if not paths:
                return pd.DataFrame(columns=["image", "score", "threshold", "verdict",
                                             "anomaly_map"])
            scores, maps = self._score_files(paths, Path(tmp))
        threshold = self.config.threshold
        verdicts = ["defective" if s > threshold else "good" for s in scores]
        return pd.DataFrame({"image": names, "score": scores, "threshold": threshold,
                             "verdict": verdicts, "anomaly_map": maps})

    def _score_files(self, paths: list[str], work: Path) -> tuple[np.ndarray, list[np.ndarray]]:
        from .features import extract_features
        from .patches import plan_patches
        from .steps import SCORE_PIECE, Ref, _patch_set, _write_table

        cfg = self.config
        manifest = _manifest(paths, cfg.category)
        # The pipeline's own patch planning; new images carry no annotation file.
        patches = plan_patches(manifest, cfg.patch_size, cfg.patch_stride,
                               cfg.min_mean_intensity, use_annotations=False)
        manifest_path = work / "manifest.parquet"
        _write_table(manifest, manifest_path)
        store = None
        if cfg.method in FEATURE_METHODS:
            # Same backbone, layers, size, normalization and denoising as training; the
            # temporary store is the same float16 store the detector saw at test time.
            store = extract_features(patches, manifest, backbone=cfg.backbone, layers=cfg.layers,
                                     input_size=cfg.input_size, mean=cfg.mean, std=cfg.std,
                                     cache_dir=work / "cache", batch_size=cfg.batch_size,
                                     device=cfg.device, progress=False, denoise=cfg.denoise)
        batch = _patch_set(store, patches, np.ones(len(patches), bool),
                           Ref(str(manifest_path), "inbox"), cfg.input_size, cfg.stats,
                           cfg.device)
        patch_scores = np.zeros(len(batch), dtype=np.float32)
        patch_maps = np.zeros((len(batch), cfg.input_size, cfg.input_size), dtype=np.float32)
        for start in range(0, len(batch), SCORE_PIECE):
            part = slice(start, min(start + SCORE_PIECE, len(batch)))
            patch_scores[part], piece_maps = self.detector.score(batch.subset(part))
            # float16 as the pipeline stores its maps, so both give the same values.
            patch_maps[part] = piece_maps.astype(np.float16)
        scores, maps = [], []
        for image_id, width, height in manifest[["image_id", "width", "height"]].itertuples(
                index=False):
            rows = np.flatnonzero(patches["image_id"].to_numpy() == image_id)
            scores.append(float(patch_scores[rows].max()))
            maps.append(_image_map(patch_maps[rows], patches.iloc[rows], int(width), int(height)))
        return np.asarray(scores, dtype=np.float64), maps


def _image_files(images, work: Path) -> tuple[list[str], list[str]]:
    """(file paths to score, display names): arrays are written to lossless PNGs first."""
    if isinstance(images, pd.DataFrame):
        if "path" not in images.columns:
            raise DefectflowError(f"expected a DataFrame with a 'path' column, got columns "
                                  f"{list(images.columns)}")
        items: Sequence = images["path"].tolist()
    elif isinstance(images, (str, Path, np.ndarray)) and not (
            isinstance(images, np.ndarray) and images.ndim == 4):
        items = [images]
    elif isinstance(images, Iterable):
        items = list(images)
    else:
        raise DefectflowError(f"cannot score {type(images).__name__}: pass paths, a DataFrame "
                              "with a 'path' column or RGB arrays")
    paths, names = [], []
    for index, item in enumerate(items):
        if isinstance(item, np.ndarray):
            if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
                raise DefectflowError(f"image array {index} must be RGB uint8 (H, W, 3), got "
                                      f"{item.dtype} {item.shape}")
            path = work / f"array-{index}.png"
            cv2.imwrite(str(path), cv2.cvtColor(item, cv2.COLOR_RGB2BGR))
            paths.append(str(path))
            names.append(f"array-{index}")
        else:
            paths.append(str(item))
            names.append(str(item))
    return paths, names


def _manifest(paths: list[str], category: str) -> pd.DataFrame:
    """A manifest of new images in the pipeline's columns (unknown label: 0, split 'test')."""
    records = []
    for index, path in enumerate(paths):
        width, height, _ = image_header(path)  # raises DefectflowError naming an unreadable file
        records.append(dict(image_id=f"{index:06d}", path=path, category=category,
                            split="test", label=0, defect_type="unknown", mask_path=None,
                            width=width, height=height, content_hash=file_hash(path)))
    return pd.DataFrame.from_records(records)


def _image_map(maps: np.ndarray, windows: pd.DataFrame, width: int, height: int) -> np.ndarray:
    """One image's anomaly map at its own resolution: one window resized, or windows stitched."""
    from .stitching import stitch

    boxes = list(windows[["x", "y", "width", "height"]].itertuples(index=False, name=None))
    if len(boxes) == 1 and boxes[0] == (0, 0, width, height):
        return cv2.resize(maps[0], (width, height), interpolation=cv2.INTER_LINEAR)
    return stitch(maps, boxes, width, height)


def write_model_folder(folder: str | Path, detector_dir: str | Path,
                       config: ScoringConfig) -> Path:
    """Lay out a self-contained model folder: ``detector/`` (a copy) and ``scoring.json``."""
    import shutil

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(detector_dir, folder / "detector", dirs_exist_ok=True)
    config.save(folder / CONFIG_NAME)
    return folder
