"""Scoring images with an exported model (``onnx_export.export_folder``) through ONNX Runtime
or OpenVINO: :class:`ExportedScorer` has ``ImageScorer``'s interface (``score(images)`` and
``config``), so the inbox, the CLI and the bench use either.

Outside the graph, each image is decoded, denoised when the run did, and resized exactly as
the pipeline does (``features.resize``); the map comes back at the input size, is rounded to
float16 as the pipeline stores maps, and is resized to the image as ``ImageScorer`` does.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from ..errors import DefectflowError
from ..features import prefetch, resize
from ..images import read_image
from ..patches import denoise_image
from .config import CONFIG_NAME, ScoringConfig
from ..methods import METHODS
from .onnx_export import DETECTOR_DIR, EXPORT_JSON, FORMATS, INPUT_NAME
from .scorer import materialize_images, verdict_frame


# Images per search when the graph ends at patch features: the search takes the patches of
# this many images in one call (its per-call work amortized), as the pyfunc does. The graph
# itself runs on export.json's batch_size (8) at a time: measured faster per image than 64
# (OpenVINO on 2 cores: 266 against 219 images/s on Magnetic Tile, /work/exp/ov10/ov_modes.py).
FEATURE_BATCH = 64


def _missing_extra(exc: ImportError) -> DefectflowError:
    return DefectflowError(f"scoring an exported model needs the optional packages of the "
                           f"'export' extra (pip install -e '.[export]'): {exc}")


class _OnnxRuntime:
    def __init__(self, path: Path, threads: int | None):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise _missing_extra(exc) from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        # Every provider this onnxruntime build has, in its order of preference (CUDA
        # before CPU in the GPU build).
        self.session = ort.InferenceSession(str(path), options,
                                            providers=ort.get_available_providers())

    def __call__(self, pixels: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {INPUT_NAME: pixels})


class _OpenVino:
    def __init__(self, path: Path, threads: int | None, device: str):
        try:
            import openvino
        except ImportError as exc:
            raise _missing_extra(exc) from None
        core = openvino.Core()
        # f32 everywhere: on CPUs with AMX/AVX512-BF16 OpenVINO otherwise runs bf16, which
        # moves the scores by far more than the parity guarantees allow.
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads and device == "CPU":
            config["INFERENCE_NUM_THREADS"] = threads
        self.model = core.compile_model(core.read_model(str(path)), device, config)
        self.request = self.model.create_infer_request()

    def __call__(self, pixels: np.ndarray) -> list[np.ndarray]:
        """The outputs, as views of OpenVINO's own buffers (no copy): valid until the next
        call, which is all the scorer needs."""
        result = self.request.infer({INPUT_NAME: pixels}, share_inputs=True, share_outputs=True)
        return [result[output] for output in self.model.outputs]


class ExportedScorer:
    """An exported model folder (``model.onnx`` or ``model.xml``, ``export.json``,
    ``scoring.json``) scored through its runtime. ``threads``: the runtime's thread count
    (None: its default); ``device``: OpenVINO's device (``CPU``, ``GPU``, ``AUTO``)."""

    def __init__(self, folder: str | Path, threads: int | None = None, device: str = "CPU"):
        folder = Path(folder)
        if not (folder / EXPORT_JSON).is_file():
            raise DefectflowError(f"not an exported model folder (no {EXPORT_JSON})", folder)
        self.meta = json.loads((folder / EXPORT_JSON).read_text())
        self.config = ScoringConfig.load(folder / CONFIG_NAME)
        fmt = self.meta.get("format")
        if fmt not in FORMATS:
            raise DefectflowError(f"unknown export format {fmt!r} in {EXPORT_JSON}", folder)
        path = folder / self.meta["model_file"]
        if not path.is_file():
            raise DefectflowError(f"exported model file {self.meta['model_file']} missing", folder)
        self.format = fmt
        self.run = _OnnxRuntime(path, threads) if fmt == "onnx" else _OpenVino(path, threads,
                                                                              device)
        self.graph_batch = self.batch_size = int(self.meta.get("batch_size", 8))
        # A PatchCore with an approximate search: the graph gives patch features, searched
        # here over the exported bank and cells by the detector's own code.
        self.detector = None
        if self.meta.get("search"):
            self.detector = METHODS[self.config.method].load(folder / DETECTOR_DIR)
            self.batch_size = max(self.batch_size, FEATURE_BATCH)

    def score_pixels(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores (n,) and float32 maps (n, S, S) of resized RGB uint8 images (n, S, S, 3)."""
        size = self.config.features.input_size
        scores = np.empty(len(pixels), dtype=np.float32)
        maps = np.empty((len(pixels), size, size), dtype=np.float32)
        for start in range(0, len(pixels), self.batch_size):
            part = slice(start, start + self.batch_size)
            if self.detector is None:
                scores[part], maps[part] = self.run(np.ascontiguousarray(pixels[part], np.uint8))
            else:
                scores[part], maps[part] = self.detector.score_embedded(
                    self._features(pixels[part]), size)
        return scores, maps

    def _features(self, pixels: np.ndarray) -> np.ndarray:
        """The graph's patch features of ``pixels``, run ``graph_batch`` images at a time."""
        features = None
        for start in range(0, len(pixels), self.graph_batch):
            part = slice(start, start + self.graph_batch)
            out = self.run(np.ascontiguousarray(pixels[part], np.uint8))[0]
            if features is None:
                features = np.empty((len(pixels), *out.shape[1:]), dtype=np.float32)
            features[part] = out
        return features

    def score(self, images) -> pd.DataFrame:
        """As ``ImageScorer.score``: one row per image (image, score, threshold, verdict,
        anomaly_map at the image's resolution). An unreadable file raises DefectflowError.
        The next batch is decoded and resized in a background thread while the runtime
        scores the current one, as the pipeline's extraction does."""
        threshold = self.config.threshold
        size = self.config.features.input_size
        scores, image_maps = [], []

        def batches(paths: list[str]):
            """(resized pixels, each image's (width, height)) of ``batch_size`` images."""
            for start in range(0, len(paths), self.batch_size):
                images = [denoise_image(read_image(path), self.config.denoise)
                          for path in paths[start:start + self.batch_size]]
                yield (np.stack([resize(image, size) for image in images]),
                       [(image.shape[1], image.shape[0]) for image in images])

        with tempfile.TemporaryDirectory(prefix="defectflow-exported-") as tmp:
            paths, names = materialize_images(images, Path(tmp))
            for pixels, shapes in prefetch(batches(paths)):
                part_scores, part_maps = self.score_pixels(pixels)
                scores.append(part_scores)
                # float16 as the pipeline stores maps, then resized to the image like
                # ImageScorer.
                image_maps += [cv2.resize(m.astype(np.float16).astype(np.float32), shape,
                                          interpolation=cv2.INTER_LINEAR)
                               for m, shape in zip(part_maps, shapes)]
        if not scores:
            return verdict_frame([], [], threshold, [])
        return verdict_frame(names, np.concatenate(scores).astype(np.float64), threshold,
                             image_maps)
