"""PatchCore memory banks from 2,500 to 20,000 patches of 224 px: memory and time per size.

The kitchen-board thesis ran out of GPU memory building memory banks from
224 px patches at stride 112 (its Table 5.2: 185,875 patches failed). Each
224 px patch gives 28 x 28 = 784 feature vectors at layer-2 resolution, so
the bank grows fast. Here, for each size, a child process:

1. plans 224 px patches at stride 112 over generated large images (a textured
   surface with a few small dark defects);
2. streams their EfficientNet-Lite0 features to the on-disk store;
3. builds the coreset (1%, as the thesis) with the streaming chunked greedy
   selection, which never holds the whole bank;
4. scores a fixed set of 64 patches against the bank (faiss, exact).

Per size it prints: feature vectors, peak resident memory of the child,
extraction time, coreset time, scoring throughput. Then it fits
``time = a * N^slope`` on log-log axes and extrapolates from the largest size
(with ``max(slope, 1)``: never less than linear growth) to the thesis's
185,875 patches.

    python bench/memory_bank.py                  # 2500 5000 10000 20000
    python bench/memory_bank.py --sizes 500 1000 # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

THESIS_PATCHES = 185_875
PATCH, STRIDE, SIDE = 224, 112, 2016  # 2016 px images: 17 x 17 = 289 windows each


def make_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    import cv2

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    for i in range(count):
        grain = 128 + 30 * np.sin(xx / rng.uniform(4, 9) + rng.uniform(0, 6)) \
            + 15 * np.cos(yy / rng.uniform(20, 40))
        image = np.clip(grain + rng.normal(0, 8, grain.shape), 0, 255).astype(np.uint8)
        image = np.repeat(image[:, :, None], 3, axis=2)
        for _ in range(3):  # a few small pits, like BSData's
            cx, cy = rng.integers(50, SIDE - 50, size=2)
            cv2.circle(image, (int(cx), int(cy)), int(rng.integers(4, 10)), (30, 30, 30), -1)
        path = folder / f"large_{i:03d}.png"
        cv2.imwrite(str(path), image)
        paths.append(path)
    return paths


def child(n_patches: int, work: Path) -> dict:
    """One size, measured in its own process so its peak memory is its own."""
    import pandas as pd

    from defectflow.tasks.feature_settings import FeatureSettings
    from defectflow.tasks.features import extract_features
    from defectflow.tasks.images import file_hash
    from defectflow.tasks.methods import PatchCore, PatchSet
    from defectflow.tasks.methods.patchcore import PatchCoreParams
    from defectflow.tasks.patches import patch_windows

    per_image = len(patch_windows(SIDE, SIDE, PATCH, STRIDE))
    paths = make_images(work / "images", -(-n_patches // per_image))
    manifest = pd.DataFrame([dict(image_id=p.stem, path=str(p), split="train", label=0,
                                  defect_type="good", mask_path=None, category="large",
                                  width=SIDE, height=SIDE, channels=3,
                                  content_hash=file_hash(p)) for p in paths])
    rows = [dict(patch_id=f"{p.stem}@{x},{y}", image_id=p.stem, category="large",
                 split="train", x=x, y=y, width=w, height=h, label=0, mean_intensity=0.0)
            for p in paths for x, y, w, h in patch_windows(SIDE, SIDE, PATCH, STRIDE)]
    table = pd.DataFrame(rows[:n_patches])
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    layers = ("blocks.2", "blocks.4")

    start = time.perf_counter()
    settings = FeatureSettings(layers=layers, input_size=PATCH, batch_size=8, device="cpu")
    store = extract_features(table, manifest, settings, mean=mean, std=std,
                             cache_dir=work / "cache", progress=False)
    extraction = time.perf_counter() - start

    paths_by_id = dict(zip(manifest.image_id, manifest.path))
    train = PatchSet(table, store, np.arange(len(table)), paths_by_id, PATCH, mean, std)
    detector = PatchCore(PatchCoreParams(layers=layers, coreset_ratio=0.01))
    start = time.perf_counter()
    detector.fit(train)
    coreset = time.perf_counter() - start

    probe = train.subset(slice(0, 64))
    start = time.perf_counter()
    detector.score(probe)
    scoring = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(patches=n_patches, vectors=int(detector.bank_vectors_seen),
                bank=len(detector.memory_bank), peak_gb=peak_kb / 1024 ** 2,
                extraction_s=extraction, coreset_s=coreset, score_patches_per_s=64 / scoring)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2500, 5000, 10000, 20000])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.work))))
        return

    results = []
    print(f"{'patches':>8} {'vectors':>11} {'bank':>8} {'peak RSS':>9} {'extract s':>10} "
          f"{'coreset s':>10} {'score patch/s':>14}", flush=True)
    for size in args.sizes:
        with tempfile.TemporaryDirectory(prefix="defectflow-membank-") as work:
            out = subprocess.run([sys.executable, __file__, "--child", str(size), "--work", work],
                                 capture_output=True, text=True,
                                 env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if out.returncode != 0:
            sys.exit(out.stderr[-3000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"{r['patches']:>8} {r['vectors']:>11,} {r['bank']:>8,} {r['peak_gb']:>7.2f}GB "
              f"{r['extraction_s']:>10.1f} {r['coreset_s']:>10.1f} "
              f"{r['score_patches_per_s']:>14.1f}", flush=True)

    if len(results) >= 2:
        n = np.log([r["patches"] for r in results])
        for key in ("coreset_s", "extraction_s"):
            slope, intercept = np.polyfit(n, np.log([r[key] for r in results]), 1)
            # A slope below 1 only means fixed costs still weigh at these sizes: extrapolate
            # from the largest run with at least linear growth, never below it.
            largest = results[-1]
            predicted = largest[key] * (THESIS_PATCHES / largest["patches"]) ** max(slope, 1.0)
            print(f"{key[:-2]} time ~ N^{slope:.2f} (log-log slope; target <= 1.15 for the "
                  f"coreset); predicted for the thesis's {THESIS_PATCHES:,} patches "
                  f"({THESIS_PATCHES * 784:,} vectors): {predicted / 60:.1f} min")
        print(f"peak memory at every size under 8 GB: "
              f"{'yes' if max(r['peak_gb'] for r in results) < 8 else 'NO'}")


if __name__ == "__main__":
    main()
