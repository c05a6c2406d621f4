"""Shared fixtures: tiny generated datasets and an isolated Prefect/MLflow environment."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest

# Offline and quiet, before Prefect or MLflow are imported by any test module.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# A private Prefect home per test session: its result cache never leaks between sessions.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="defectflow-prefect-")


def wait_for_http(url: str, process, log: Path, timeout: float) -> None:
    """Wait until ``url`` answers 200, failing the test with the server's log if the
    process ends or ``timeout`` seconds pass first."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no answer from {url}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def textured_image(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A 'good product': a regular stripe texture with mild noise (RGB uint8)."""
    yy, xx = np.mgrid[0:size, 0:size]
    phase = rng.uniform(0, 2 * np.pi)
    base = 120 + 40 * np.sin(xx / 3.0 + phase)
    noisy = base + rng.normal(0, 6, size=(size, size))
    gray = np.clip(noisy, 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def add_defect(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A dark blob with a bright rim at a random place; returns (image, mask)."""
    size = image.shape[0]
    cx, cy = rng.integers(size // 4, 3 * size // 4, size=2)
    radius = int(rng.integers(size // 10, size // 6))
    out = image.copy()
    mask = np.zeros(image.shape[:2], np.uint8)
    cv2.circle(out, (int(cx), int(cy)), radius + 2, (250, 250, 250), -1)
    cv2.circle(out, (int(cx), int(cy)), radius, (20, 20, 20), -1)
    cv2.circle(mask, (int(cx), int(cy)), radius + 2, 255, -1)
    return out, mask


def make_folder_dataset(root: Path, n_good: int = 30, n_bad: int = 8, size: int = 64,
                        seed: int = 0) -> Path:
    """The generic layout: good/, scratch/ with masks/scratch/<stem>.png."""
    rng = np.random.default_rng(seed)
    (root / "good").mkdir(parents=True)
    (root / "blob").mkdir()
    (root / "masks" / "blob").mkdir(parents=True)
    for i in range(n_good):
        cv2.imwrite(str(root / "good" / f"g{i:03d}.png"), textured_image(rng, size))
    for i in range(n_bad):
        image, mask = add_defect(textured_image(rng, size), rng)
        cv2.imwrite(str(root / "blob" / f"b{i:03d}.png"), image)
        cv2.imwrite(str(root / "masks" / "blob" / f"b{i:03d}.png"), mask)
    return root


def object_on_dark_image(rng: np.random.Generator, height: int = 600, width: int = 800,
                         defect: bool = False, depth: float = 0.3,
                         shift: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """One textured object in the middle of a large, dark, nearly uniform background, as a
    camera gives it (RGB uint8, mask uint8): the object shifts by up to ``shift`` of the
    frame between images, and the background level, the gain and the sensor noise vary a
    little per image. A defect is subtle and on the object only: a soft-edged dent that
    darkens the texture by ``depth`` (30%: about the grooves' own contrast, no saturated
    blob)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cy = height / 2 + rng.uniform(-shift, shift) * height
    cx = width / 2 + rng.uniform(-shift, shift) * width
    ry, rx = 0.22 * height, 0.2 * width
    # Soft-edged ellipse: the object covers about an eighth of the frame.
    inside = np.clip(1.0 - (np.hypot((yy - cy) / ry, (xx - cx) / rx) - 1.0) * min(ry, rx) / 2,
                     0.0, 1.0)
    period = 0.03 * height                                  # machined grooves, at a fixed angle
    grooves = np.sin(2 * np.pi * ((xx - cx) * 0.8 + (yy - cy) * 0.6) / period
                     + rng.uniform(-0.3, 0.3))
    grain = cv2.GaussianBlur(rng.normal(0, 1, (height, width)).astype(np.float32), (0, 0), 1.5)
    surface = 120 + 30 * grooves + 12 * grain
    mask = np.zeros((height, width), np.uint8)
    if defect:
        # Inside the object, away from its rim.
        angle, radius = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.55)
        dy, dx = cy + radius * ry * np.sin(angle), cx + radius * rx * np.cos(angle)
        size = rng.uniform(0.035, 0.06) * height
        dent = np.exp(-0.5 * (np.hypot(yy - dy, xx - dx) / size) ** 4)
        surface = surface * (1 - depth * dent)
        mask[(dent > 0.3) & (inside > 0.5)] = 255
    background = rng.uniform(8, 14)                          # level varies per image
    gain = rng.uniform(0.95, 1.05)                           # exposure / gain drift
    noise = rng.uniform(1.0, 2.0)                            # sensor noise, per image
    gray = gain * (inside * surface + (1 - inside) * background)
    gray = gray + rng.normal(0, noise, (height, width))
    gray = np.clip(np.round(gray), 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2), mask


def make_object_on_dark_dataset(root: Path, n_good: int = 30, n_bad: int = 8,
                                height: int = 600, width: int = 800, seed: int = 0,
                                depth: float = 0.3, shift: float = 0.15) -> Path:
    """The folder layout of :func:`object_on_dark_image` images: good/, dent/, masks/dent/."""
    rng = np.random.default_rng(seed)
    for folder in ("good", "dent", "masks/dent"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(n_good):
        cv2.imwrite(str(root / "good" / f"g{i:03d}.png"),
                    object_on_dark_image(rng, height, width, shift=shift)[0])
    for i in range(n_bad):
        image, mask = object_on_dark_image(rng, height, width, defect=True, depth=depth,
                                           shift=shift)
        cv2.imwrite(str(root / "dent" / f"d{i:03d}.png"), image)
        cv2.imwrite(str(root / "masks" / "dent" / f"d{i:03d}.png"), mask)
    return root


def dark_scene_sets(root: Path, size: int = 128):
    """The camera scene of ``tests/test_dark_background.py`` (40 good, 10 dented images of
    150 x 200 px, Lite0 ``blocks.2`` + ``blocks.4`` at ``size`` px), extracted in ``root``:
    (manifest, train PatchSet, test PatchSet, test rows). ``bench/dark_scene.py`` uses it too."""
    from defectflow.tasks import datasets, features
    from defectflow.tasks.feature_settings import FeatureSettings
    from defectflow.tasks.methods import PatchSet
    from defectflow.tasks.normalization import channel_stats
    from defectflow.tasks.patches import plan_patches

    product = make_object_on_dark_dataset(root / "product", n_good=40, n_bad=10,
                                          height=150, width=200)
    manifest = datasets.scan_dataset("folder", product).manifest
    patches = plan_patches(manifest)
    paths = dict(zip(manifest.image_id, manifest.path))
    stats = channel_stats(patches[patches.split == "train"], paths)
    store = features.extract_features(
        patches, manifest, FeatureSettings(layers=("blocks.2", "blocks.4"), input_size=size),
        mean=stats["mean"], std=stats["std"], cache_dir=root / "cache", progress=False)

    def subset(split):
        pos = np.flatnonzero((patches["split"] == split).to_numpy())
        return PatchSet(patches.iloc[pos].reset_index(drop=True), store, pos, paths, size,
                        tuple(stats["mean"]), tuple(stats["std"]))

    test_rows = patches[patches.split == "test"].reset_index(drop=True)
    return manifest, subset("train"), subset("test"), test_rows


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny convolutions: on a loaded 2-core machine a second intra-op thread only spins."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def folder_dataset(tmp_path: Path) -> Path:
    return make_folder_dataset(tmp_path / "product")


def copies_as_synthetic(rows, folder: Path):
    """Copies of real images (manifest ``rows``) handed to the synthetic-defect path: their
    files and a manifest in ``folder`` (split "synthetic", ids ``copy/<i>``), as its Ref."""
    import shutil

    from defectflow.tasks.cache import Ref

    copies = rows.copy()
    (folder / "images").mkdir()
    for i, path in enumerate(copies["path"]):
        shutil.copy(path, folder / "images" / f"{i}.png")
    copies["path"] = [str(folder / "images" / f"{i}.png") for i in range(len(copies))]
    copies["image_id"] = [f"copy/{i}" for i in range(len(copies))]
    copies["split"] = "synthetic"
    copies.to_parquet(folder / "manifest.parquet", index=False)
    return Ref(str(folder), "copies-of-real-images")


def prepared_product(root: Path, n_good: int = 30, n_bad: int = 8):
    """A generated folder dataset, scanned and planned: (manifest, patches, paths, stats)."""
    from defectflow.tasks import datasets
    from defectflow.tasks.normalization import channel_stats
    from defectflow.tasks.patches import plan_patches

    make_folder_dataset(root, n_good=n_good, n_bad=n_bad)
    manifest = datasets.scan_dataset("folder", root).manifest
    patches = plan_patches(manifest)
    paths = dict(zip(manifest.image_id, manifest.path))
    stats = channel_stats(patches[patches.split == "train"], paths)
    return manifest, patches, paths, stats


def product_feature_sets(root: Path, layers, size: int = 64):
    """A generated folder dataset with its features extracted: (manifest, train PatchSet,
    test PatchSet), for the detectors that read the feature store."""
    from defectflow.tasks import features
    from defectflow.tasks.feature_settings import FeatureSettings
    from defectflow.tasks.methods import PatchSet

    manifest, patches, paths, stats = prepared_product(root / "product")
    store = features.extract_features(
        patches, manifest, FeatureSettings(layers=tuple(layers), input_size=size),
        mean=stats["mean"], std=stats["std"], cache_dir=root / "cache", progress=False)

    def subset(split):
        pos = np.flatnonzero((patches["split"] == split).to_numpy())
        return PatchSet(patches.iloc[pos].reset_index(drop=True), store, pos, paths, size,
                        tuple(stats["mean"]), tuple(stats["std"]))

    return manifest, subset("train"), subset("test")
