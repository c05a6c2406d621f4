"""PatchCore side by side: defectflow's and anomalib's, on the same data, weights and settings.

    python bench/vs_anomalib.py --anomalib-python /work/venvs/anomalib/bin/python --quick
    python bench/vs_anomalib.py --anomalib-python /work/venvs/anomalib/bin/python   # full

Installs nothing: anomalib 2.7 must be importable by ``--anomalib-python``
(default: this interpreter; see README "Performance" for the set-up). The
data is an MVTec AD category folder (``--data``) or, by default, Magnetic
Tile (``--magnetic-tile``, our ``magnetic_tile`` layout and split) exported
once to MVTec layout under ``--cache-dir``. ``--quick`` uses a seeded subset
of the images at a smaller input size.

Both sides get the same images (the exported PNG files), the same
EfficientNet-Lite0 ImageNet weights (checked: both extractors give the same
feature maps on a probe input), input size, layers, coreset ratio and
neighbour count, the same thread count, and one run each, one after the
other. Metrics are computed by the same code for both (image AUROC; pixel
AUROC against the masks resized to the input size). Stage timings:

* feature extraction: train images to backbone features (ours: the
  pipeline's ``extract_features`` into a fresh feature store; anomalib: its
  training epoch up to the coreset);
* coreset selection: ours ``StreamingCoreset``; anomalib
  ``subsample_embedding`` (KCenterGreedy);
* fit end-to-end: images to fitted model (ours: feature extraction plus
  ``PatchCore.fit``; anomalib: ``Engine.fit``);
* scoring: test images to scores and maps (ours: ``extract_features`` plus
  ``PatchCore.score``; anomalib: ``Engine.predict``);
* bare backbone: a plain batched forward pass of the same backbone, up to the
  deepest layer, over already decoded and normalized train images: the floor
  for feature extraction throughput (measured just before and just after our
  extraction, after a warm-up pass, over the same images; the mean counts,
  as this machine's speed drifts by up to 2x within minutes). Printed with
  it, for reference: the same pass with the batch norms folded into the
  convolutions, as our extraction runs the backbone.

Remaining differences, by design of each library: resizing (ours OpenCV
area interpolation, anomalib torchvision antialiased bilinear), the coreset
(ours greedy k-center on a 128-dim Gaussian projection, streamed in chunks of
16,384 vectors with a second greedy pass over the oversampled chunk picks,
anomalib one greedy pass over the whole bank on a sparse projection), our
backbone runs with folded batch norms (features equal to within 1e-4 of their
scale), and anomalib's extractor runs the whole network while ours stops
after the deepest requested layer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from defectflow.tasks import datasets  # noqa: E402
from defectflow.tasks.backbones import fold_batchnorm, load_backbone  # noqa: E402
from defectflow.tasks.errors import DefectflowError  # noqa: E402
from defectflow.tasks.evaluation import pixel_metrics  # noqa: E402
from defectflow.tasks.export import export_mvtec, limit_manifest  # noqa: E402
from defectflow.tasks.feature_settings import FeatureSettings  # noqa: E402
from defectflow.tasks.features import extract_features, preprocess, resolve_device  # noqa: E402
from defectflow.tasks.images import read_image, read_mask  # noqa: E402
from defectflow.tasks.methods.base import PatchSet  # noqa: E402
from defectflow.tasks.methods.patchcore import PatchCore, PatchCoreParams  # noqa: E402
from defectflow.tasks.patches import plan_patches  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKBONE = "efficientnet_lite0"
# --quick: a seeded subset (train images, test images per defect type) at a small size.
QUICK_TRAIN, QUICK_TEST_PER_TYPE, QUICK_SIZE = 40, 12, 256


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="defectflow PatchCore vs anomalib Patchcore, side by side.")
    parser.add_argument("--data", type=Path,
                        help="an MVTec AD category folder (train/good, test/*, ground_truth/*); "
                             "default: Magnetic Tile exported to MVTec layout")
    parser.add_argument("--magnetic-tile", type=Path, default=REPO / "../shared/data/magnetic-tile",
                        help="Magnetic Tile root (MT_*/Imgs), used without --data")
    parser.add_argument("--anomalib-python", default=os.environ.get("ANOMALIB_PYTHON",
                                                                    sys.executable),
                        help="interpreter with anomalib 2.7 (default: $ANOMALIB_PYTHON or this one)")
    parser.add_argument("--input-size", type=int, help=f"default 256 ({QUICK_SIZE} with --quick)")
    parser.add_argument("--layers", nargs="+", default=["blocks.2", "blocks.4"])
    parser.add_argument("--coreset-ratio", type=float, default=0.01)
    parser.add_argument("--neighbours", type=int, default=9,
                        help="b of the image-score reweighting (anomalib's num_neighbors)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0,
                        help="anomalib data-loader worker processes (ours prefetches in a thread)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads, the same on both sides")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (both sides)")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_TRAIN} train and {QUICK_TEST_PER_TYPE} test images per "
                             f"defect type at {QUICK_SIZE} px: a short check, not the figure")
    parser.add_argument("--skip-anomalib", action="store_true", help="run our side only")
    parser.add_argument("--ours", action="append", default=[], metavar="KEY=VALUE",
                        help="another methods.patchcore parameter for our side, e.g. "
                             "coreset_oversample=1 (repeatable; the default is our defaults)")
    parser.add_argument("--floor-images", type=int, default=1000,
                        help="train images decoded in memory for the bare-backbone floor "
                             "(all of them up to this many; 3 MB each at 256 px)")
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".defectflow-cache" / "bench")
    parser.add_argument("--json", type=Path, help="also write all figures to this file")
    args = parser.parse_args(argv)
    args.input_size = args.input_size or (QUICK_SIZE if args.quick else 256)
    args.device = resolve_device(args.device)
    return args


def prepare_data(args) -> Path:
    """The MVTec-layout category folder both sides read (exported when needed)."""
    if args.data is not None:
        data = args.data.expanduser().resolve()
        if not args.quick:
            return data
        manifest = datasets.scan_dataset("mvtec", data).manifest
        category = data.name
    else:
        manifest = datasets.scan_dataset("magnetic_tile", args.magnetic_tile,
                                         category="magnetic_tile").manifest
        category = "magnetic_tile"
    if args.quick:
        manifest = limit_manifest(manifest, QUICK_TRAIN, QUICK_TEST_PER_TYPE)
    return export_mvtec(manifest, args.cache_dir / "mvtec", category)


def relative_id(path: str, data: Path) -> str:
    return str(Path(path).resolve().relative_to(data))


def floor_inputs(args, manifest) -> torch.Tensor:
    """The train images (up to ``--floor-images``), decoded and normalized in memory."""
    train = manifest[manifest["split"] == "train"].head(args.floor_images)
    return torch.from_numpy(np.stack([
        preprocess(read_image(p), args.input_size, IMAGENET_MEAN, IMAGENET_STD)
        for p in train["path"]]))


def bare_backbone(args, inputs: torch.Tensor) -> dict:
    """Images/s of a plain batched forward pass over decoded, normalized images.

    The plain network in both memory formats (the faster one is the floor)
    and, for reference, the network with its batch norms folded into the
    convolutions, as our extraction runs it. One untimed warm-up pass first
    (on 2 cores a first pass runs up to 2x slower), then one timed pass of
    each variant over all the images.
    """
    plain = load_backbone(BACKBONE, args.layers, device=args.device)
    folded = fold_batchnorm(plain).to(memory_format=torch.channels_last)
    variants = (("contiguous", plain, torch.contiguous_format),
                ("channels_last", plain, torch.channels_last),
                ("channels_last_bn_folded", folded, torch.channels_last))
    rates = {}
    with torch.inference_mode():
        for batch in inputs.split(args.batch_size):  # warm-up
            folded(batch.to(args.device).contiguous(memory_format=torch.channels_last))
        for name, model, fmt in variants:
            model = model.to(memory_format=fmt)
            batches = [b.to(args.device).contiguous(memory_format=fmt)
                       for b in inputs.split(args.batch_size)]
            sync(args.device)
            started = time.perf_counter()
            for batch in batches:
                model(batch)
            sync(args.device)
            rates[name] = len(inputs) / (time.perf_counter() - started)
    return {"images_per_s": max(rates["contiguous"], rates["channels_last"]),
            "bn_folded_images_per_s": rates["channels_last_bn_folded"], "by_variant": rates,
            "images": len(inputs)}


def mean_floor(*floors: dict) -> dict:
    """The mean of floors measured at different times: this machine's speed drifts by up
    to 2x within minutes, so the floor is measured right before and right after our
    extraction, over as many images."""
    mean = dict(floors[0])
    for key in ("images_per_s", "bn_folded_images_per_s"):
        mean[key] = float(np.mean([floor[key] for floor in floors]))
    mean["measurements"] = list(floors)
    return mean


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_ours(args, data: Path, work: Path) -> dict:
    manifest = datasets.scan_dataset("mvtec", data).manifest
    patches = plan_patches(manifest)
    paths = dict(zip(manifest["image_id"], manifest["path"]))
    inputs = floor_inputs(args, manifest)
    floor_before = bare_backbone(args, inputs)

    def patch_set(split: str):
        rows = np.flatnonzero((patches["split"] == split).to_numpy())
        table = patches.iloc[rows].reset_index(drop=True)
        started = time.perf_counter()
        # A fresh cache folder: the store is computed, never found.
        settings = FeatureSettings(backbone=BACKBONE, layers=tuple(args.layers),
                                   input_size=args.input_size, batch_size=args.batch_size,
                                   device=args.device)
        store = extract_features(table, manifest, settings, mean=IMAGENET_MEAN,
                                 std=IMAGENET_STD, cache_dir=work / split, progress=False)
        seconds = time.perf_counter() - started
        return PatchSet(table, store, np.arange(len(table)), paths, args.input_size,
                        IMAGENET_MEAN, IMAGENET_STD, device=args.device), seconds

    train, extract_s = patch_set("train")
    floor = mean_floor(floor_before, bare_backbone(args, inputs))
    del inputs
    params = PatchCoreParams(layers=tuple(args.layers), coreset_ratio=args.coreset_ratio,
                             num_neighbors=args.neighbours, **ours_overrides(args.ours))
    detector = PatchCore(params).fit(train)
    test, test_extract_s = patch_set("test")
    started = time.perf_counter()
    scores, maps = detector.score(test)
    score_s = time.perf_counter() - started
    image_ids = test.table["image_id"].tolist()
    by_id = manifest.set_index("image_id")
    return {
        "train_images": len(train), "test_images": len(test),
        "memory_bank": list(detector.memory_bank.shape), "bare_backbone": floor,
        "timings": {"feature_extraction": extract_s, "coreset": detector.fit_seconds["coreset"],
                    "fit": extract_s + detector.fit_seconds["total"],
                    "scoring": test_extract_s + score_s, "scoring_knn_only": score_s},
        "paths": [relative_id(by_id.loc[i, "path"], data) for i in image_ids],
        "scores": scores.tolist(), "maps": maps,
    }


def ours_overrides(items: list[str]) -> dict:
    """``--ours KEY=VALUE`` items as PatchCore parameters (values read as YAML scalars)."""
    import yaml

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in PatchCoreParams.__dataclass_fields__:
            raise SystemExit(f"error: --ours {item!r}: expected KEY=VALUE with KEY one of "
                             f"{sorted(PatchCoreParams.__dataclass_fields__)}")
        overrides[key] = yaml.safe_load(value)
    return overrides


def run_anomalib(args, data: Path, work: Path) -> dict:
    out = work / "anomalib"
    command = [args.anomalib_python, str(REPO / "bench" / "_anomalib_side.py"),
               "--data", str(data), "--out", str(out), "--input-size", str(args.input_size),
               "--layers", *args.layers, "--coreset-ratio", str(args.coreset_ratio),
               "--neighbours", str(args.neighbours), "--batch-size", str(args.batch_size),
               "--workers", str(args.workers), "--device", args.device,
               "--threads", str(args.threads)]
    started = time.perf_counter()
    try:
        completed = subprocess.run(command, capture_output=True, text=True)
    except OSError as error:
        raise SystemExit(f"error: --anomalib-python {args.anomalib_python}: {error}") from None
    if completed.returncode != 0:
        return {"failed": anomalib_failure(completed, time.perf_counter() - started, args)}
    result = json.loads((out / "result.json").read_text())
    result["maps"] = np.load(out / "maps.npy").astype(np.float32)
    timings = result["timings"]
    result["timings"] = {"feature_extraction": timings["train_epoch_to_coreset"],
                         "coreset": timings["coreset"], "fit": timings["fit"],
                         "scoring": timings["predict"],
                         "backbone_train_forward": timings["backbone_train"]}
    return result


def anomalib_failure(completed: subprocess.CompletedProcess, seconds: float, args) -> str:
    """What went wrong on anomalib's side, with how far its coreset selection got."""
    lines = completed.stderr.strip().splitlines()  # tqdm's \r updates become lines
    if completed.returncode in (-9, 137):
        what = "killed by SIGKILL (out of memory, when the kernel log says so)"
    else:
        what = f"exit status {completed.returncode}"
    text = f"anomalib side failed after {seconds / 60:.1f} min ({args.anomalib_python}): {what}"
    progress = [line for line in lines if "Selecting Coreset" in line]
    if progress:
        text += f"\n  last coreset progress: {progress[-1].strip()}"
    tail = [line for line in lines if "Selecting Coreset" not in line][-15:]
    if tail:
        text += "\n  " + "\n  ".join(tail)
    if "No module named 'anomalib'" in completed.stderr:
        text += "\nanomalib is not installed there: see README 'Performance'"
    return text


def metrics(side: dict, data: Path, size: int) -> dict:
    """Image and pixel AUROC by the same code for both sides, in a fixed image order."""
    order = np.argsort(side["paths"])
    paths = [side["paths"][i] for i in order]
    scores = np.asarray(side["scores"])[order]
    labels = np.array([0 if p.split("/")[1] == datasets.GOOD else 1 for p in paths])
    masks = []
    for p in paths:
        defect, name = p.split("/")[1], Path(p).stem
        if defect == datasets.GOOD:
            masks.append(None)
            continue
        mask = read_mask(data / "ground_truth" / defect / f"{name}_mask.png")
        masks.append(cv2.resize(mask.astype(np.uint8), (size, size),
                                interpolation=cv2.INTER_NEAREST) > 0)
    maps = [side["maps"][i] for i in order]
    return {"image_auroc": float(roc_auc_score(labels, scores)),
            "pixel_auroc": pixel_metrics(masks, maps)["pixel_auroc"], "paths": paths}


def table(ours: dict, theirs: dict | None) -> str:
    def rate(side, key):
        return side["train_images"] / side["timings"][key]

    rows = [("image AUROC", "image_auroc", "{:.4f}"), ("pixel AUROC", "pixel_auroc", "{:.4f}")]
    lines = [f"{'':32s}{'defectflow':>12s}{'anomalib':>12s}{'ours/theirs':>13s}"]

    def line(label, a, b, fmt, ratio=True):
        sa = fmt.format(a)
        sb = fmt.format(b) if b is not None else "-"
        sr = f"{a / b:.3f}" if (ratio and b) else "-"
        lines.append(f"{label:32s}{sa:>12s}{sb:>12s}{sr:>13s}")

    for label, key, fmt in rows:
        line(label, ours[key], theirs[key] if theirs else None, fmt)
    for label, key in (("feature extraction (s)", "feature_extraction"),
                       ("coreset selection (s)", "coreset"), ("fit end-to-end (s)", "fit"),
                       ("scoring, test set (s)", "scoring")):
        line(label, ours["timings"][key], theirs["timings"][key] if theirs else None, "{:.2f}")
    line("feature extraction (images/s)", rate(ours, "feature_extraction"),
         rate(theirs, "feature_extraction") if theirs else None, "{:.1f}")
    floor = ours["bare_backbone"]["images_per_s"]
    folded = ours["bare_backbone"]["bn_folded_images_per_s"]
    line("bare backbone forward (images/s)", floor, None, "{:.1f}", ratio=False)
    line("  same, batch norms folded", folded, None, "{:.1f}", ratio=False)
    ours_rate = rate(ours, "feature_extraction")
    lines.append(f"{'ours / bare backbone':32s}{ours_rate / floor:>12.1%}")
    lines.append(f"{'ours / bare, batch norms folded':32s}{ours_rate / folded:>12.1%}")
    return "\n".join(lines)


def main(argv=None) -> None:
    try:
        run(parse_args(argv))
    except DefectflowError as error:  # bad input: one line naming the file and the problem
        raise SystemExit(f"error: {error}") from None


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    data = prepare_data(args)
    print(f"data {data}  input {args.input_size}px  layers {' '.join(args.layers)}  "
          f"coreset {args.coreset_ratio}  neighbours {args.neighbours}  batch {args.batch_size}  "
          f"device {args.device}  threads {args.threads}", flush=True)
    with tempfile.TemporaryDirectory(prefix="vs-anomalib-") as tmp:
        work = Path(tmp)
        ours = run_ours(args, data, work)
        ours.update(metrics(ours, data, args.input_size))
        print(f"defectflow done: fit {ours['timings']['fit']:.1f}s", flush=True)
        theirs, failure = None, None
        if not args.skip_anomalib:
            theirs = run_anomalib(args, data, work)
        if theirs is not None and "failed" in theirs:
            # Our side's figures are kept: printed and written below, with the failure.
            failure = theirs["failed"]
            print(failure, flush=True)
            theirs = None
        elif theirs is not None:
            diff = theirs["feature_max_abs_diff"]
            # Same weights in both extractors, or the comparison means nothing.
            assert max(diff.values()) < 1e-4, f"feature maps differ: {diff}"
            theirs.update(metrics(theirs, data, args.input_size))
            assert theirs["paths"] == ours["paths"], "the two sides scored different images"
            print(f"anomalib {theirs['anomalib']} done: fit {theirs['timings']['fit']:.1f}s, "
                  f"extractors agree (max abs diff {max(diff.values()):.1e})", flush=True)
    print(f"\n{ours['train_images']} train / {ours['test_images']} test images, memory bank "
          f"{ours['memory_bank'][0]} (ours) vs "
          f"{theirs['memory_bank'][0] if theirs else '-'} (anomalib) vectors\n")
    print(table(ours, theirs))
    if failure:
        print(f"\nno anomalib figures: {failure}")
    if args.json:
        keep = {k: v for k, v in ours.items() if k not in ("maps", "paths", "scores")}
        other = {k: v for k, v in (theirs or {}).items() if k not in ("maps", "paths", "scores")}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "defectflow": keep, "anomalib": other,
                                         "anomalib_failure": failure}, indent=1))


if __name__ == "__main__":
    main()
