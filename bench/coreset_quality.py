"""What the bounded coreset selection costs in accuracy: plain greedy vs chunked vs two-stage.

A plain greedy k-center coreset over the whole memory bank is quadratic in the
bank size N; ``tasks/coreset.py`` bounds it by selecting per chunk of
``coreset_chunk`` vectors. This bench fits PatchCore three times on the same
cached features and scores the same test images:

- ``whole-bank greedy``: one chunk holding the whole bank (the plain greedy of
  the PatchCore paper: quadratic, only feasible on a small bank);
- ``per chunk``: each chunk of 16,384 vectors keeps ``ratio`` of its rows
  (``coreset_oversample: 1``);
- ``two-stage``: each chunk keeps 4 x ratio, one greedy pass over all kept rows
  picks ratio x N (the default, ``coreset_oversample: 4``).

It prints the bank size, coreset seconds, fit seconds, image and pixel AUROC of
each. The default is Magnetic Tile at 128 px with a 1% coreset, small enough for
the plain greedy to finish in minutes on 2 cores:

    python bench/coreset_quality.py
    python bench/coreset_quality.py params/elpv.yaml --input-size 224 --ratio 0.01
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "whole-bank greedy": {"coreset_chunk": 1 << 40, "coreset_oversample": 1},
    "per chunk": {"coreset_oversample": 1},
    "two-stage (default)": {},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("params", nargs="?", default=str(ROOT / "params" / "magnetic-tile.yaml"))
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--cache-dir", default=None, help="default: the params file's cache_dir")
    args = parser.parse_args()

    from _pipeline import category_features_without_prefect, prepare_without_prefect

    from defectflow.tasks import scoring
    from defectflow.tasks.cache import Ref
    from defectflow.tasks.images import text_hash
    from defectflow.tasks.methods import PatchCore
    from defectflow.tasks.params import load_params
    from defectflow.tasks.steps import evaluate_step, score_step
    from defectflow.tasks.steps.common import category_rows, image_paths

    p = load_params(args.params, {"features.input_size": args.input_size})
    scanned, patches, cache = prepare_without_prefect(p, args.cache_dir)
    manifest = scanned.manifest.table()
    rows = []
    for category in sorted(manifest["category"].unique()):
        stats, store = category_features_without_prefect(p, scanned, patches, category, cache)
        table = category_rows(patches, category)
        train = scoring.patch_set(store, table, (table["split"] == "train").to_numpy(),
                                  image_paths(scanned.manifest), p.features, stats)
        for variant, options in VARIANTS.items():
            base = p.methods.get(PatchCore.name) or PatchCore.Params(layers=p.features.layers)
            params = dataclasses.replace(base, coreset_ratio=args.ratio, **options)
            start = time.perf_counter()
            detector = PatchCore(params).fit(train)
            fit_s = time.perf_counter() - start
            # Score and evaluate through the pipeline's own steps (a fresh key per variant).
            model_dir = Path(cache) / "bench" / "coreset_quality" / f"{category}-{variant[:9]}"
            detector.save(model_dir)
            (model_dir / "train_defects.json").write_text("[]")  # as train_step writes it
            model = Ref(str(model_dir), text_hash("coreset_quality", category, variant,
                                                json.dumps(params.__dict__, default=str),
                                                store.key))
            scores = score_step(model, store, patches, scanned.manifest, category, PatchCore.name,
                                p.features, stats, cache)
            evaluated = evaluate_step(scores, scanned.manifest, category, 0.99, 0, cache)
            metrics = json.loads((Path(evaluated.path) / "metrics.json").read_text())
            rows.append((category, variant, len(detector.memory_bank), detector.fit_seconds["coreset"],
                         fit_s, metrics["image_auroc"], metrics.get("pixel_auroc")))
            print(f"[{category}] {variant}: coreset {detector.fit_seconds['coreset']:.1f} s, "
                  f"image AUROC {metrics['image_auroc']:.4f}", flush=True)

    print()
    print(f"params: {args.params}, input {args.input_size} px, coreset ratio {args.ratio}, "
          f"features cached in {cache}")
    print(f"{'category':<14} {'selection':<20} {'kept':>8} {'coreset s':>10} {'fit s':>7} "
          f"{'image AUROC':>12} {'pixel AUROC':>12}  (of {train.table.shape[0]} train images)")
    for category, variant, kept, coreset_s, fit_s, image, pixel in rows:
        pixel_text = f"{pixel:12.4f}" if pixel is not None else f"{'-':>12}"
        print(f"{category:<14} {variant:<20} {kept:8d} {coreset_s:10.1f} {fit_s:7.1f} "
              f"{image:12.4f} {pixel_text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
