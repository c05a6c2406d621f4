"""Exporting a registered detector (its model folder: ``detector/`` + ``scoring.json``) as one
self-contained ONNX or OpenVINO model, with ``export.json`` beside it.

The graph (``torch.onnx.export``, opset 17; OpenVINO converts that ONNX file):

    pixels uint8 (B, S, S, 3), RGB, already resized to the model's input size S
      -> normalization (the run's mean, std) as a lookup table          preprocessing
      -> backbone (batch norms folded, as the pipeline extracts)       features
      -> each layer's maps rounded to float16 and back, in float32     as the pipeline's store
         arithmetic (float16_rounded)
      -> the detector's ``torch_head`` (methods.torch_heads)           head + map post-processing
      -> score (B,) float32, anomaly_map (B, S, S) float32

A PatchCore with an approximate search (``search: ivf``) ends the graph at its embedded
patch features instead; its ``detector/`` folder (bank and saved cells) is copied beside the
model and ``exported.ExportedScorer`` searches it with the detector's own code.

The resize stays outside the graph: OpenCV's INTER_AREA (used to shrink, INTER_LINEAR to
grow) has no exact ONNX equivalent. So does the optional non-local-means denoising.
``exported.ExportedScorer`` does both exactly as the pipeline does, then runs the graph.
The verdict is ``defective`` when score > threshold (``export.json``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..backbones import fold_batchnorm, load_backbone
from ..errors import DefectflowError
from ..features import normalize_batch
from ..methods import METHODS
from .config import CONFIG_NAME, ScoringConfig

EXPORT_JSON = "export.json"
FORMATS = ("onnx", "openvino")
MODEL_FILES = {"onnx": "model.onnx", "openvino": "model.xml"}
OPSET = 17
# Bumped whenever the graph computes differently: an export logged by an older graph is
# made anew instead of fetched (tracking.exports.fetch_exported). 2: the normalization as a
# lookup table and float16_rounded, with which OpenVINO keeps the pipeline's values.
GRAPH_VERSION = 2
INPUT_NAME, SCORE_NAME, MAP_NAME = "pixels", "score", "anomaly_map"
FEATURES_NAME = "features"
DETECTOR_DIR = "detector"
# The exact search holds a (batch, patches, bank) distance matrix: batches are sized so
# that it stays under this many bytes.
DISTANCE_BYTES = 256 << 20


class ExportGraph(nn.Module):
    """Preprocessing, backbone, float16 rounding of the features and the detector's head.

    The normalization is a lookup table of the 256 levels of each channel, computed by
    ``features.normalize_batch`` itself, so the backbone gets the pipeline's very values in
    every runtime. The division it replaces is not safe in an export: OpenVINO's CPU plugin
    turns a division by a constant into a multiplication by its reciprocal, which rounds
    differently, and that moved the features of the whole backbone.
    """

    def __init__(self, backbone: nn.Module, layers, head: nn.Module, mean, std):
        super().__init__()
        self.backbone = backbone
        self.layers = list(layers)
        self.head = head
        levels = np.repeat(np.arange(256, dtype=np.uint8)[None, None, :, None], 3, axis=3)
        table = normalize_batch(levels, mean, std, "cpu")[0, :, 0, :]  # (3 channels, 256)
        self.register_buffer("table", table.reshape(-1).contiguous())
        self.register_buffer("channel_offset", torch.arange(3) * 256)

    def forward(self, pixels: torch.Tensor):
        x = self.table[pixels.long() + self.channel_offset].permute(0, 3, 1, 2)
        feats = self.backbone(x)
        return self.head([float16_rounded(feats[layer]) for layer in self.layers])


def float16_rounded(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest float16 (ties to even) and back, computed in float32.

    The plain cast is not safe in an export: OpenVINO's CPU plugin drops a float32 ->
    float16 -> float32 round trip, so its features were not rounded as the pipeline's
    float16 store rounds them. Here each value's float16 spacing (2^-24 below 2^-14, then
    2^(e-10) for values in [2^e, 2^(e+1))) is found by a binary search over the exponent
    with exact comparisons, and ``x`` is rounded to a multiple of it (products and
    divisions by powers of two and ``round`` are exact). Equal bit for bit to
    ``x.half().float()`` for every float32 of magnitude up to 65504, float16's largest
    value (checked over all float16 values, their neighbours and the midpoints between them
    in torch, ONNX Runtime and OpenVINO: tests/test_export_values.py); beyond it the cast
    gives infinity, this a finite value.
    """
    magnitude = x.abs()
    spacing = torch.full_like(x, 2.0 ** -24)
    for step in (16, 8, 4, 2, 1):  # up to 31 doublings: 2^-24 .. 2^5 covers float16's range
        # The spacing may double 2^step times if the value reaches 2^10 times that spacing.
        spacing = torch.where(magnitude >= spacing * 2.0 ** (step + 10),
                              spacing * 2.0 ** step, spacing)
    return torch.round(x / spacing) * spacing


def load_model_folder(folder: str | Path):
    """(scoring settings, fitted detector) of a detector's model folder, or a one-line
    error saying why it cannot be exported."""
    folder = Path(folder)
    if (folder / "fusion").is_dir():
        raise DefectflowError("a SegAD fusion cannot be exported: its XGBoost forest and "
                              "segment features have no export path yet (export the fused "
                              "detectors instead)", folder)
    if not (folder / CONFIG_NAME).is_file():
        raise DefectflowError(f"not a detector's model folder (no {CONFIG_NAME})", folder)
    config = ScoringConfig.load(folder / CONFIG_NAME)
    if config.method not in METHODS:
        raise DefectflowError(f"unknown method {config.method!r} in the scoring settings", folder)
    if config.patch_size is not None:
        raise DefectflowError(f"a model scoring {config.patch_size} px patches cannot be "
                              "exported yet: only whole-image models (patches.size: null) are",
                              folder)
    if config.features.combined:
        raise DefectflowError("a model on combined features (features.sources) cannot be "
                              "exported yet: its several networks and PCA have no export path",
                              folder)
    detector = METHODS[config.method].load(folder / "detector")
    if type(detector).export_refusal is not None:
        detector.torch_head(config.features.input_size)  # raises the detector's reason
    return config, detector


def build_graph(folder: str | Path) -> tuple[ExportGraph, ScoringConfig, object]:
    """The torch graph of a detector's model folder, its scoring settings and detector."""
    config, detector = load_model_folder(folder)
    features = config.features
    head = detector.torch_head(features.input_size)
    layers = detector.params.layers
    missing = [layer for layer in layers if layer not in features.layers]
    if missing:
        raise DefectflowError(f"the detector reads layers {missing} that the scoring settings' "
                              f"backbone layers {list(features.layers)} lack", folder)
    backbone = fold_batchnorm(load_backbone(features.backbone, layers, device="cpu"))
    return ExportGraph(backbone, layers, head, config.mean, config.std).eval(), config, detector


def _batch_size(graph: ExportGraph, size: int) -> int:
    """Images per run of the graph: the search's distance matrix bounded (PatchCore),
    otherwise the pipeline's batch of 8."""
    bank = getattr(graph.head, "bank", None)
    if bank is None:
        return 8
    with torch.no_grad():
        grid = graph.backbone(torch.zeros(1, 3, size, size))[graph.layers[0]].shape[-2:]
    per_image = int(grid[0] * grid[1]) * int(bank.shape[0]) * 4
    return max(1, min(8, DISTANCE_BYTES // per_image))


def searches_outside(graph: ExportGraph) -> bool:
    """The graph ends at patch features, searched by the exported scorer (PatchCore with an
    approximate search), instead of at scores and maps."""
    return bool(getattr(graph.head, "outputs_features", False))


def _write_onnx(graph: ExportGraph, size: int, path: Path) -> None:
    example = torch.zeros(1, size, size, 3, dtype=torch.uint8)
    outputs = [FEATURES_NAME] if searches_outside(graph) else [SCORE_NAME, MAP_NAME]
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter warns that it is deprecated in favour of the dynamo one,
        # which needs onnxscript; this graph exports exactly with it.
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (example,), str(path), opset_version=OPSET, dynamo=False,
                          input_names=[INPUT_NAME], output_names=outputs,
                          dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *outputs]})


def export_folder(folder: str | Path, fmt: str, out: str | Path) -> Path:
    """Write the exported model of a detector's model folder into ``out``: the model
    (``model.onnx``, or ``model.xml`` + ``model.bin``), ``export.json`` and a copy of
    ``scoring.json``. Returns ``out``."""
    if fmt not in FORMATS:
        raise DefectflowError(f"unknown export format {fmt!r}: choose from {list(FORMATS)}")
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
        if fmt == "openvino":
            import openvino
    except ImportError as exc:
        raise DefectflowError(f"exporting needs the optional packages of the 'export' extra "
                              f"(pip install -e '.[export]'): {exc}") from None
    graph, config, detector = build_graph(folder)
    refusal = type(detector).format_refusals.get(fmt)
    if refusal:
        raise DefectflowError(f"a {detector.name} detector cannot be exported to {fmt}: "
                              f"{refusal}", folder)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    size = config.features.input_size
    with tempfile.TemporaryDirectory(prefix="defectflow-export-") as tmp:
        onnx_path = Path(tmp) / MODEL_FILES["onnx"]
        _write_onnx(graph, size, onnx_path)
        if fmt == "onnx":
            shutil.copy2(onnx_path, out / MODEL_FILES["onnx"])
        else:
            # FP32 weights: compressing them to FP16 would break the score parity.
            openvino.save_model(openvino.convert_model(str(onnx_path)),
                                str(out / MODEL_FILES["openvino"]), compress_to_fp16=False)
    shutil.copy2(Path(folder) / CONFIG_NAME, out / CONFIG_NAME)
    outside = searches_outside(graph)
    if outside:
        # The bank and its saved cells: the exported scorer searches them as the pyfunc does.
        shutil.copytree(Path(folder) / DETECTOR_DIR, out / DETECTOR_DIR, dirs_exist_ok=True)
    meta = describe(config, detector, fmt, _batch_size(graph, size))
    if outside:
        with torch.no_grad():
            grid = graph.backbone(torch.zeros(1, 3, size, size))[graph.layers[0]].shape[-2:]
        meta["search"] = detector.params.search
        meta["outputs"] = [{"name": FEATURES_NAME, "dtype": "float32",
                            "shape": ["batch", int(grid[0]), int(grid[1]), "features"],
                            "note": f"patch features; the {detector.params.search} search over "
                                    f"{DETECTOR_DIR}/ (memory bank and its cells), the "
                                    "scores and maps run outside the graph "
                                    "(PatchCore.score_embedded)"}]
    (out / EXPORT_JSON).write_text(json.dumps(meta, indent=1))
    return out


def describe(config: ScoringConfig, detector, fmt: str, batch_size: int) -> dict:
    """``export.json``: what a caller outside Python needs to run the model."""
    size = config.features.input_size
    return {
        "format": fmt, "model_file": MODEL_FILES[fmt], "opset": OPSET,
        "graph_version": GRAPH_VERSION,
        "method": config.method, "dataset": config.dataset, "category": config.category,
        "backbone": config.features.backbone, "layers": list(detector.params.layers),
        "input_size": size, "mean": list(config.mean), "std": list(config.std),
        "threshold": config.threshold, "verdict": "defective when score > threshold",
        "batch_size": batch_size,
        "inputs": [{"name": INPUT_NAME, "dtype": "uint8", "shape": ["batch", size, size, 3],
                    "layout": "NHWC, RGB",
                    "preprocessing outside the graph":
                        f"decode to RGB uint8; denoise {config.denoise} (OpenCV "
                        "fastNlMeansDenoisingColored) when set; resize to "
                        f"{size}x{size} with OpenCV INTER_AREA to shrink, INTER_LINEAR to "
                        "grow; normalization (mean, std) is inside the graph"}],
        "outputs": [{"name": SCORE_NAME, "dtype": "float32", "shape": ["batch"]},
                    {"name": MAP_NAME, "dtype": "float32", "shape": ["batch", size, size],
                     "note": "at the input size; resize bilinearly to the image's size"}],
        "denoise": config.denoise, "map_vmax": config.map_vmax,
    }
