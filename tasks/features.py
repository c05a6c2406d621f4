"""The content-addressed feature store.

Backbone feature maps of every patch are written once, as float16 ``.npy``
files, under ``<cache_dir>/features/<key>/`` where the key hashes everything
that determines them: the patches (image content hashes and windows), the
backbone, its layers, the input size and the normalization. A second request
with the same key opens the files memory-mapped and computes nothing.
Files are written to a temporary folder that is renamed into place when
complete, so an interrupted run never leaves a store that looks finished.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from queue import Empty, Queue
from typing import Callable

import cv2
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import cores
from .cache import allocated_memmap, cached_folder
from .feature_settings import FeatureSettings
from .images import text_hash
from .patches import iter_patch_pixels


@dataclass(frozen=True)
class FeatureStoreRef:
    """A small, picklable descriptor of a finished feature store."""

    key: str
    directory: str
    layers: tuple[str, ...]
    count: int

    def exists(self) -> bool:
        """Whether every file of the store is still on disk (a deleted store is recomputed)."""
        folder = Path(self.directory)
        names = ["meta.json", "patches.parquet", *(f"{_safe(layer)}.npy" for layer in self.layers)]
        return all((folder / name).is_file() for name in names)

    def maps(self, layer: str) -> np.ndarray:
        """Feature maps of one layer, (count, C, h, w) float16, memory-mapped."""
        return np.load(Path(self.directory) / f"{_safe(layer)}.npy", mmap_mode="r")

    def patch_ids(self) -> list[str]:
        return pd.read_parquet(Path(self.directory) / "patches.parquet")["patch_id"].tolist()


@dataclass(frozen=True)
class TrainedNetwork:
    """A network trained in this run that stands in for a named backbone (CutPaste's
    encoder): ``identity`` (its content key) takes the backbone name's place in the store
    key, and ``load(layers, device)`` builds it as a ``backbones.Backbone``."""

    identity: str
    load: Callable


def _safe(layer: str) -> str:
    return layer.replace("/", "_")


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resize(crop: np.ndarray, input_size: int) -> np.ndarray:
    """RGB uint8 crop → RGB uint8 (S, S, 3): area interpolation to shrink, bilinear to grow."""
    if crop.shape[0] != input_size or crop.shape[1] != input_size:
        shrinking = crop.shape[0] > input_size or crop.shape[1] > input_size
        crop = cv2.resize(crop, (input_size, input_size),
                          interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return crop


def preprocess(crop: np.ndarray, input_size: int, mean, std) -> np.ndarray:
    """RGB uint8 crop → normalized float32 (3, S, S) network input."""
    pixels = resize(crop, input_size).astype(np.float32) / 255.0
    pixels = (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _batches(patch_table: pd.DataFrame, paths: dict[str, str], batch_size: int,
             denoise: dict | None, transform) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(row positions, stacked ``transform(crop)``) per ``batch_size`` patches, in table order."""
    positions, batch = [], []
    for pos, crop in iter_patch_pixels(patch_table, paths, denoise):
        positions.append(pos)
        batch.append(transform(crop))
        if len(batch) == batch_size:
            yield np.asarray(positions), np.stack(batch)
            positions, batch = [], []
    if batch:
        yield np.asarray(positions), np.stack(batch)


def iter_input_batches(patch_table: pd.DataFrame, paths: dict[str, str], input_size: int,
                       mean, std, batch_size: int, denoise: dict | None = None
                       ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(row positions, (B, 3, S, S) float32 inputs) in patch-table order."""
    return _batches(patch_table, paths, batch_size, denoise,
                    lambda crop: preprocess(crop, input_size, mean, std))


def iter_pixel_batches(patch_table: pd.DataFrame, paths: dict[str, str], input_size: int,
                       batch_size: int, denoise: dict | None = None
                       ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(row positions, resized RGB uint8 (B, S, S, 3)) in patch-table order."""
    return _batches(patch_table, paths, batch_size, denoise, lambda crop: resize(crop, input_size))


def normalize_batch(pixels: np.ndarray, mean, std, device: str) -> torch.Tensor:
    """Resized uint8 (B, S, S, 3) → normalized float32 (B, 3, S, S) on ``device``.

    Moves uint8 (4x fewer bytes than float) and normalizes there, in the same
    operations as :func:`preprocess`, so the values are the same. The result
    is channels_last: the (B, S, S, 3) pixels already are, so no copy.
    """
    batch = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).float()
    shape = (1, 3, 1, 1)
    batch.div_(255.0)
    batch.sub_(torch.tensor(mean, dtype=torch.float32, device=device).view(shape))
    batch.div_(torch.tensor(std, dtype=torch.float32, device=device).view(shape))
    return batch


def prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """``items``, produced by a background thread up to ``depth`` ahead.

    Decoding and resizing the next batch (OpenCV releases the GIL) then
    overlaps the backbone's forward pass of the current one, which brings
    feature extraction close to the bare forward-pass throughput.
    Exceptions of the producer are raised here, in the consumer.
    """
    queue: Queue = Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                if stop.is_set():
                    return
                queue.put((True, item))
            queue.put((True, done))
        except BaseException as error:  # handed to the consumer, which re-raises it
            queue.put((False, error))

    worker = threading.Thread(target=produce, name="defectflow-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            ok, item = queue.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        # The consumer stopped early (error or break): let the producer finish and exit.
        stop.set()
        while worker.is_alive():
            try:
                queue.get(timeout=0.1)
            except Empty:
                pass
        worker.join()


def feature_store_key(patch_table: pd.DataFrame, content_hashes: dict[str, str], backbone: str,
                      layers, input_size: int, mean, std, denoise: dict | None = None) -> str:
    """Hash of what determines the features; paths and run ids are deliberately left out."""
    windows = text_hash(*(f"{content_hashes[r.image_id]}:{r.x},{r.y},{r.width},{r.height}"
                          for r in patch_table.itertuples(index=False)))
    return text_hash("features-v1", windows, backbone, tuple(layers), input_size,
                     tuple(round(float(v), 6) for v in mean),
                     tuple(round(float(v), 6) for v in std),
                     json.dumps(denoise or None, sort_keys=True))


def open_store(cache_dir: str | Path, key: str) -> FeatureStoreRef | None:
    """The finished store with this key, or None."""
    directory = Path(cache_dir) / "features" / key
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    found = FeatureStoreRef(key, str(directory), tuple(meta["layers"]), int(meta["count"]))
    if not found.exists():
        # Some of its files were deleted: compute the store again, whole.
        shutil.rmtree(directory, ignore_errors=True)
        return None
    return found


def _prepared(model: torch.nn.Module) -> torch.nn.Module:
    """A backbone as extraction runs it: batch norms folded into the convolutions (one pass
    over every activation saved), channels_last (EfficientNet's depthwise convolutions ~1.7x
    faster on CPU)."""
    from .backbones import fold_batchnorm

    return fold_batchnorm(model).to(memory_format=torch.channels_last)


@lru_cache(maxsize=4)
def extraction_model(backbone: str, layers: tuple[str, ...], device: str) -> torch.nn.Module:
    """The prepared ``backbone`` cut after ``layers``, built once per process: building it
    (reading the weights, folding the batch norms) took 0.21 s, which a served model paid on
    every request (REST, batches of 8 Magnetic Tile images: 26 ms per image;
    /work/exp/ov10/small_batches.py). Frozen and in eval mode, so callers share it."""
    from .backbones import load_backbone

    return _prepared(load_backbone(backbone, layers, device=device))


def extract_features(patch_table: pd.DataFrame, manifest: pd.DataFrame,
                     settings: FeatureSettings, *, mean, std, cache_dir: str | Path,
                     progress: bool = True, denoise: dict | None = None,
                     network: TrainedNetwork | None = None) -> FeatureStoreRef:
    """Feature maps of every patch, computed once per key and streamed to disk
    (``network``: a trained network in place of ``settings.backbone``'s weights)."""
    backbone, layers, input_size = settings.backbone, settings.layers, settings.input_size
    content_hashes = dict(zip(manifest["image_id"], manifest["content_hash"]))
    paths = dict(zip(manifest["image_id"], manifest["path"]))
    key = feature_store_key(patch_table, content_hashes,
                            backbone if network is None else network.identity, layers,
                            input_size, mean, std, denoise)
    found = open_store(cache_dir, key)
    if found is not None:
        return found

    device = resolve_device(settings.device)
    model = (extraction_model(backbone, tuple(layers), device) if network is None
             else _prepared(network.load(layers, device)))
    with cached_folder(cache_dir, "features", key) as out:
        if out.missing:
            _write_feature_maps(out.partial, model, patch_table, paths, layers, input_size,
                                settings.batch_size, mean, std, device, denoise,
                                desc=f"features {backbone}" if progress else None)
            patch_table[["patch_id", "image_id"]].to_parquet(out.partial / "patches.parquet")
            (out.partial / "meta.json").write_text(json.dumps(
                {"key": key, "backbone": backbone, "layers": list(layers),
                 **({"network": network.identity} if network is not None else {}),
                 "input_size": input_size, "mean": list(mean), "std": list(std),
                 "denoise": denoise, "count": len(patch_table)}, indent=1))
    return open_store(cache_dir, key)


def _write_feature_maps(folder: Path, model, patch_table: pd.DataFrame, paths: dict[str, str],
                        layers: tuple, input_size: int, batch_size: int, mean, std,
                        device: str, denoise: dict | None, desc: str | None) -> None:
    """Every patch's maps of every layer, streamed into ``<folder>/<layer>.npy`` (float16);
    a progress bar titled ``desc`` unless it is None."""
    count = len(patch_table)
    outputs: dict[str, np.ndarray] = {}
    bar = tqdm(total=count, desc=desc, unit="patch", disable=desc is None)
    with torch.inference_mode():
        # Decoding and resizing run in a background thread; normalization on the device.
        batches = iter_pixel_batches(patch_table, paths, input_size, batch_size, denoise)
        for positions, pixels in prefetch(batches):
            cores.follow()  # the current share of the cores, when steps run side by side
            feats = model(normalize_batch(pixels, mean, std, device))
            for layer in layers:
                fmap = feats[layer].to(torch.float16).cpu().numpy()
                if layer not in outputs:
                    # Streamed into an on-disk array: memory stays bounded by one batch.
                    outputs[layer] = allocated_memmap(folder / f"{_safe(layer)}.npy",
                                                      np.float16, (count, *fmap.shape[1:]))
                outputs[layer][positions] = fmap
            bar.update(len(positions))
    bar.close()
    for array in outputs.values():
        array.flush()
