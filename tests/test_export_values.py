"""The exported graph feeds the backbone and the detector head the pipeline's very values, in
every runtime: the normalization as a lookup table made by ``features.normalize_batch``, and
the float16 rounding of the feature store in float32 arithmetic (``float16_rounded``).

Both replace operations that OpenVINO's CPU plugin changes: it turns a division by a
constant into a multiplication by its reciprocal and drops a float32 -> float16 -> float32
round trip. Before, that moved every OpenVINO feature map and with it the scores.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from defectflow.tasks.features import normalize_batch
from defectflow.tasks.serving.onnx_export import ExportGraph, float16_rounded

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def hard_values() -> np.ndarray:
    """Every finite float16, its float32 neighbours, the exact midpoints between consecutive
    float16 values (the ties) and theirs, and random values over 15 decades; both signs."""
    halves = np.arange(0, 0x7BFF + 1, dtype=np.uint16).view(np.float16).astype(np.float32)
    mids = ((halves[:-1].astype(np.float64) + halves[1:]) / 2).astype(np.float32)
    rng = np.random.default_rng(0)
    spread = (rng.standard_normal(200_000) * 10.0 ** rng.uniform(-10, 4.8, 200_000))
    values = [halves, mids, spread.astype(np.float32)]
    for towards in (0.0, np.inf):
        values += [np.nextafter(halves, np.float32(towards)),
                   np.nextafter(mids, np.float32(towards))]
    values = np.concatenate(values)
    values = np.concatenate([values, -values])
    return values[np.abs(values) <= 65504].astype(np.float32)


def test_float16_rounding_in_float32_arithmetic_is_the_cast_bit_for_bit():
    values = hard_values()
    ours = float16_rounded(torch.from_numpy(values)).numpy()
    truth = values.astype(np.float16).astype(np.float32)
    assert np.array_equal(ours.view(np.uint32), truth.view(np.uint32))


class _Features(nn.Module):
    """A 'backbone' whose one feature map is its input: the graph's output is then the
    normalized, float16-rounded pixels that a real backbone would have been given."""

    def forward(self, x):
        return {"input": x}


class _Head(nn.Module):
    def forward(self, maps):
        return maps[0]


def _graph() -> ExportGraph:
    return ExportGraph(_Features(), ["input"], _Head(), MEAN, STD).eval()


def _pixels(n: int = 4, size: int = 32) -> np.ndarray:
    pixels = np.random.default_rng(1).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    pixels[0].reshape(-1, 3)[:256] = np.arange(256, dtype=np.uint8)[:, None]  # every level
    return pixels


def _expected(pixels: np.ndarray) -> np.ndarray:
    """What the pipeline stores: normalize_batch, then the float16 cast."""
    return normalize_batch(pixels, MEAN, STD, "cpu").half().float().numpy()


def test_the_graphs_preprocessing_is_the_pipelines_in_torch():
    pixels = _pixels()
    with torch.no_grad():
        ours = _graph()(torch.from_numpy(pixels)).numpy()
    assert np.array_equal(ours, _expected(pixels))


def _export(module: nn.Module, example: torch.Tensor, folder: Path) -> Path:
    path = folder / "graph.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), opset_version=17, dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "n"}})
    return path


def _run(runtime: str, path: Path, folder: Path, inputs: np.ndarray) -> np.ndarray:
    if runtime == "onnxruntime":
        import onnxruntime as ort

        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            None, {"x": inputs})[0]
    import openvino

    xml = folder / "graph.xml"   # through the saved IR, as the exported model is used
    openvino.save_model(openvino.convert_model(str(path)), str(xml), compress_to_fp16=False)
    core = openvino.Core()
    compiled = core.compile_model(core.read_model(str(xml)), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32"})
    return np.asarray(compiled.create_infer_request().infer({0: inputs})[compiled.outputs[0]])


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_exported_preprocessing_and_rounding_keep_the_pipelines_values(runtime):
    pytest.importorskip("onnx", reason="the optional 'export' extra is not installed")
    pytest.importorskip(runtime, reason="the optional 'export' extra is not installed")

    class Rounding(nn.Module):
        def forward(self, x):
            return float16_rounded(x)

    values, pixels = hard_values(), _pixels()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rounded = _run(runtime, _export(Rounding(), torch.from_numpy(values[:4]), folder),
                       folder, values)
        (folder / "p").mkdir()
        graph = _run(runtime, _export(_graph(), torch.from_numpy(pixels[:1]), folder / "p"),
                     folder / "p", pixels)
    truth = values.astype(np.float16).astype(np.float32)
    assert np.array_equal(rounded.view(np.uint32), truth.view(np.uint32))
    assert np.array_equal(graph, _expected(pixels))


@pytest.mark.parametrize("grid,size,sigma", [(28, 224, 4.0), (4, 16, 4.0), (9, 32, 2.5),
                                             (7, 56, 0.0), (3, 8, 4.0)])
def test_the_pipelines_map_post_processing_is_the_exported_one(grid, size, sigma):
    """upsample_and_smooth (OpenCV, the pipeline's CPU maps) against MapPost (the exported
    graph's torch form) and F.interpolate + scipy's gaussian_filter, to float32 rounding;
    a blur wider than the map (radius 16 > 8 px) goes through scipy."""
    import torch.nn.functional as F
    from scipy.ndimage import gaussian_filter

    from defectflow.tasks.methods.torch_heads import MapPost, upsample_and_smooth

    scores = (np.random.default_rng(grid).random((3, grid, grid)) * 30).astype(np.float32)
    ours = upsample_and_smooth(scores, size, sigma)
    reference = F.interpolate(torch.from_numpy(scores[:, None]), size=(size, size),
                              mode="bilinear", align_corners=False)[:, 0].numpy()
    if sigma > 0:
        reference = np.stack([gaussian_filter(m, sigma=sigma) for m in reference])
    assert ours.shape == (3, size, size) and ours.dtype == np.float32
    assert np.abs(ours - reference).max() <= 1e-6 * np.abs(reference).max()
    if MapPost.fits(size, sigma):
        with torch.no_grad():
            exported = MapPost(size, sigma)(torch.from_numpy(scores)).numpy()
        assert np.abs(ours - exported).max() <= 1e-6 * np.abs(reference).max()
