"""Scoring new images with a registered detector or SegAD fusion, exactly as the pipeline
scored its test images.

:class:`ImageScorer` loads a detector's model folder (``model_folder.write_model_folder``)
and scores images through the pipeline's own code: ``patches.plan_patches`` for the
windows, ``scoring.new_images_batch`` for the detector's input (backbone features into a
temporary store) and ``scoring.score_pieces`` for ``Detector.score``. An image's score is
the maximum over its patches, as in ``evaluation.image_scores``.

:class:`FusionScorer` loads a fusion's model folder
(``model_folder.write_fusion_model_folder``): one ``ImageScorer`` per fused detector, the
forest ``steps.fusion_step`` fitted to serve and the segment map.

Images come as paths, a DataFrame with a ``path`` column or RGB arrays
(``materialize_images``).
"""

from __future__ import annotations

import base64
import binascii
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from .. import fusion as segad
from ..errors import DefectflowError
from ..fusion.deploy import (FOREST_NAME, FUSION_CONFIG_NAME, SEGMENTS_NAME, FusionConfig,
                             fused_map)
from ..images import file_hash, image_header
from ..methods import METHODS
from ..patches import plan_patches
from ..scoring import new_images_batch, score_pieces
from ..stitching import stitch
from .config import B64_COLUMN, CONFIG_NAME, ScoringConfig


def verdict_frame(names, scores, threshold: float, maps) -> pd.DataFrame:
    """The scorers' result: image, score, threshold, verdict (``defective`` when
    score > threshold, else ``good``) and anomaly_map, one row per image."""
    verdicts = ["defective" if s > threshold else "good" for s in scores]
    return pd.DataFrame({"image": list(names), "score": list(scores), "threshold": threshold,
                         "verdict": verdicts, "anomaly_map": list(maps)},
                        columns=["image", "score", "threshold", "verdict", "anomaly_map"])


class ImageScorer:
    """A fitted detector plus its scoring settings: ``score(images)`` -> scores and maps."""

    def __init__(self, detector_dir: str | Path, config: ScoringConfig):
        if config.method not in METHODS:
            raise DefectflowError(f"unknown method {config.method!r} in the scoring settings")
        self.config = config
        self.detector = METHODS[config.method].load(detector_dir)
        self.detector_dir = Path(detector_dir)  # with the files combined features need

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ImageScorer":
        """A folder holding ``detector/`` and ``scoring.json`` (what ``write_model_folder`` makes)."""
        folder = Path(folder)
        return cls(folder / "detector", ScoringConfig.load(folder / CONFIG_NAME))

    def score(self, images) -> pd.DataFrame:
        """Score images; one row per image, in input order.

        ``images``: a DataFrame with a ``path`` column (or an ``image_b64`` column of
        base64-encoded image files, with an optional ``name``), one path, a list of
        paths, or a list of RGB uint8 arrays (H, W, 3). Returns columns ``image`` (the
        path, or ``array-<i>``), ``score``, ``threshold``, ``verdict``
        (``defective`` when score > threshold, else ``good``) and ``anomaly_map``
        (float32 (H, W) at the image's resolution; NaN where no patch looked).
        An unreadable file raises DefectflowError naming it.
        """
        with tempfile.TemporaryDirectory(prefix="defectflow-score-") as tmp:
            paths, names = materialize_images(images, Path(tmp))
            if not paths:
                return verdict_frame([], [], self.config.threshold, [])
            scores, maps = self._score_files(paths, Path(tmp))
        return verdict_frame(names, scores, self.config.threshold, maps)

    def _score_files(self, paths: list[str], work: Path) -> tuple[np.ndarray, list[np.ndarray]]:
        manifest, patches, patch_scores, patch_maps = self._score_windows(paths, work)
        rows_of = pd.Series(np.arange(len(patches))).groupby(
            patches["image_id"].to_numpy()).indices
        boxes = patches[["x", "y", "width", "height"]].to_numpy()
        scores, maps = [], []
        for image_id, width, height in manifest[["image_id", "width", "height"]].itertuples(
                index=False):
            rows = rows_of.get(image_id, np.empty(0, dtype=np.int64))
            scores.append(float(patch_scores[rows].max()))
            maps.append(_image_map(patch_maps[rows].astype(np.float32), boxes[rows],
                                   int(width), int(height)))
        return np.asarray(scores, dtype=np.float64), maps

    def score_windows(self, paths: list[str], work: Path
                      ) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray, np.ndarray]:
        """(manifest, patch windows, patch scores, float32 patch maps at input size) of
        image files.

        The maps are float16-rounded as the pipeline stores them. ``work`` holds the
        temporary feature store: scorers sharing one ``work`` folder and the same feature
        settings reuse one extraction (the store is content-addressed).
        """
        manifest, patches, patch_scores, patch_maps = self._score_windows(paths, work)
        return manifest, patches, patch_scores, patch_maps.astype(np.float32)

    def _score_windows(self, paths: list[str], work: Path
                       ) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray, np.ndarray]:
        """``score_windows`` with the maps left float16, as stored: converted one image at a
        time, not all at once (hundreds of MB for an inbox of a few hundred images)."""
        cfg = self.config
        manifest = _manifest(paths, cfg.category)
        # The pipeline's own patch planning; new images carry no annotation file.
        patches = plan_patches(manifest, cfg.patch_size, cfg.patch_stride,
                               cfg.min_mean_intensity, use_annotations=False)
        # Same backbone, layers, size, normalization and denoising as training; the
        # temporary store is the same float16 store the detector saw at test time.
        batch = new_images_batch(manifest, patches, cfg.features, cfg.stats, work / "cache",
                                 with_features=type(self.detector).reads_features,
                                 model_dir=self.detector_dir)
        size = cfg.features.input_size
        patch_maps = np.zeros((len(batch), size, size), dtype=np.float16)
        patch_scores = score_pieces(self.detector, batch, patch_maps)
        return manifest, patches, patch_scores, patch_maps


def materialize_images(images, work: Path) -> tuple[list[str], list[str]]:
    """(file paths to score, display names) of ``images`` (see ``ImageScorer.score``):
    arrays are written to lossless PNGs in ``work`` first."""
    if isinstance(images, pd.DataFrame) and B64_COLUMN in images.columns:
        return _decode_b64(images, work)
    if isinstance(images, pd.DataFrame):
        if "path" not in images.columns:
            raise DefectflowError(f"expected a DataFrame with a 'path' or '{B64_COLUMN}' "
                                  f"column, got columns {list(images.columns)}")
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


def _decode_b64(images: pd.DataFrame, work: Path) -> tuple[list[str], list[str]]:
    """Rows carrying an image file's bytes, base64-encoded (REST requests), written to
    ``work``; the display name is the row's ``name`` column when there is one."""
    paths, names = [], []
    for index, row in enumerate(images.to_dict("records")):
        try:
            data = base64.b64decode(str(row[B64_COLUMN]), validate=True)
        except (binascii.Error, ValueError):
            raise DefectflowError(f"row {index}: {B64_COLUMN} is not valid base64") from None
        path = work / f"b64-{index}"
        path.write_bytes(data)
        paths.append(str(path))
        names.append(str(row.get("name") or f"b64-{index}"))
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


def _image_map(maps: np.ndarray, boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """One image's anomaly map at its own resolution: one window (``boxes``: (n, 4) x, y,
    width, height) resized, or windows stitched."""
    boxes = [tuple(int(v) for v in box) for box in boxes]
    if len(boxes) == 1 and boxes[0] == (0, 0, width, height):
        return cv2.resize(maps[0], (width, height), interpolation=cv2.INTER_LINEAR)
    return stitch(maps, boxes, width, height)


class FusionScorer:
    """The SegAD fusion served: one ``ImageScorer`` per fused detector, the segment map and
    the fusion the pipeline chose to serve (``FusionConfig.model``: the forest, the stacker
    or one detector). ``score(images)`` gives the same columns as ``ImageScorer.score``: the
    score is that fusion's (the forest's margin, ...), the map ``fused_map`` resized to the
    image."""

    def __init__(self, folder: str | Path):
        from xgboost import XGBClassifier  # heavy: only a served fusion loads it

        folder = Path(folder)
        self.config = FusionConfig.load(folder / "fusion" / FUSION_CONFIG_NAME)
        self.scorers = {m: ImageScorer.from_folder(folder / "detectors" / m)
                        for m in self.config.detectors}
        self.segments = np.load(folder / "fusion" / SEGMENTS_NAME)
        forest = None
        if self.config.model == segad.FOREST:  # else the stacker or one detector: no forest
            forest = XGBClassifier(n_jobs=1)  # one thread: serving shares the CPU
            try:
                forest.load_model(str(folder / "fusion" / FOREST_NAME))
            except Exception as exc:  # xgboost raises its own XGBoostError
                raise DefectflowError(f"cannot load the fusion forest ({exc})",
                                      folder / "fusion" / FOREST_NAME) from None
        self.fusion = self.config.fitted(forest)
        for method, scorer in self.scorers.items():
            if scorer.config.patch_size is not None or \
                    scorer.config.features.input_size != self.config.map_size:
                raise DefectflowError(f"detector {method!r} does not score whole images at "
                                      f"{self.config.map_size} px as the fusion needs", folder)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "FusionScorer":
        return cls(folder)

    def score(self, images) -> pd.DataFrame:
        """Score images (as ``ImageScorer.score`` takes them); one row per image, in order."""
        with tempfile.TemporaryDirectory(prefix="defectflow-fuse-") as tmp:
            paths, names = materialize_images(images, Path(tmp))
            if not paths:
                return verdict_frame([], [], self.config.threshold, [])
            maps, own, manifest = [], [], None
            for method in self.config.detectors:
                # One work folder: detectors with the same feature settings share the store.
                manifest, windows, patch_scores, patch_maps = \
                    self.scorers[method].score_windows(paths, Path(tmp))
                # Whole images: one window per image; put them in the manifest's order.
                row_of = {image_id: row for row, image_id in enumerate(windows["image_id"])}
                rows = [row_of[i] for i in manifest["image_id"]]
                maps.append(patch_maps[rows])
                own.append(np.asarray(patch_scores)[rows])
        ids = manifest["image_id"].tolist()
        frame = pd.concat([segad.feature_frame(maps, self.segments, ids,
                                               list(self.config.detectors),
                                               k=self.config.n_segments),
                           segad.score_frame(own, ids, list(self.config.detectors))], axis=1)
        scores = self.fusion.score(frame)
        fused = fused_map(maps, self.config)
        sizes = manifest[["width", "height"]].to_numpy()
        image_maps = [cv2.resize(m, (int(w), int(h)), interpolation=cv2.INTER_LINEAR)
                      for m, (w, h) in zip(fused, sizes)]
        return verdict_frame(names, scores, self.config.threshold, image_maps)
