"""CPU training time of every detector on Magnetic Tile, with each method's main settings.

Runs the pipeline's plain steps (no Prefect, no MLflow) on the data of a
params file (default ``params/magnetic-tile-all.yaml``): scan, patches,
normalization and features once (from the shared cache when present), then
for each method a timed fit and a timed scoring of the test images, and
prints a table: method, main settings, fit seconds, score seconds, image AUROC.

    python bench/methods.py
    python bench/methods.py params/elpv-all.yaml --methods patchcore padim
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from defectflow.tasks.methods import CutPaste, FeatureEnsemble, FineTunedClassifier, PaDiM, PatchCore

ROOT = Path(__file__).resolve().parents[1]
MAIN_SETTINGS = {
    PatchCore.name: ("coreset_ratio", "num_neighbors"),
    PaDiM.name: ("n_channels",),
    FeatureEnsemble.name: ("n_components", "epochs", "hidden"),
    CutPaste.name: ("epochs", "images_per_epoch", "augmentations"),
    FineTunedClassifier.name: ("epochs", "unfreeze", "n_defective"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("params", nargs="?", default=str(ROOT / "params" / "magnetic-tile-all.yaml"))
    parser.add_argument("--methods", nargs="+", help="default: the params file's methods")
    args = parser.parse_args()

    from _pipeline import category_features_without_prefect, prepare_without_prefect

    from defectflow.tasks import scoring
    from defectflow.tasks.evaluation import image_metrics
    from defectflow.tasks.methods import METHODS
    from defectflow.tasks.params import load_params, method_params
    from defectflow.tasks.steps import labelled_defects
    from defectflow.tasks.steps.common import category_rows, image_paths

    p = load_params(args.params)
    scanned, patches, cache = prepare_without_prefect(p)
    manifest = scanned.manifest.table()
    paths = image_paths(scanned.manifest)
    rows = []
    for category in sorted(manifest["category"].unique()):
        start = time.perf_counter()
        stats, store = category_features_without_prefect(p, scanned, patches, category, cache)
        print(f"[{category}] features ready in {time.perf_counter() - start:.1f} s "
              "(0 when cached)", flush=True)
        table = category_rows(patches, category)
        for method in args.methods or list(p.methods):
            params = p.methods.get(method) or method_params(method, {}, p.features.layers)
            detector_cls = METHODS[method]
            selected = (table["split"] == "train").to_numpy()
            defects = []
            if detector_cls.needs_labelled_defects:
                defects = labelled_defects(manifest, category, params.n_defective, params.seed)
                selected = selected | table["image_id"].isin(defects).to_numpy()
            train = scoring.patch_set(store, table, selected, paths, p.features, stats)
            test = scoring.patch_set(store, table, ((table["split"] == "test")
                                                   & ~table["image_id"].isin(defects)).to_numpy(),
                                     paths, p.features, stats)
            start = time.perf_counter()
            detector = detector_cls(params).fit(train)
            fit_s = time.perf_counter() - start
            start = time.perf_counter()
            scores, _ = detector.score(test)
            score_s = time.perf_counter() - start
            # Image labels from the manifest (the defect folder), as the pipeline's evaluation:
            # a patch label comes from the mask, and some defective images have empty masks.
            labels = manifest.set_index("image_id").loc[test.table["image_id"], "label"]
            auroc = image_metrics(labels.to_numpy(), scores, np.inf)["image_auroc"]
            values = dataclasses.asdict(params)
            settings = ", ".join(f"{k}={values[k]}" for k in MAIN_SETTINGS.get(method, ())
                                 if k in values)
            rows.append((category, method, settings, fit_s, score_s, len(train), len(test), auroc))
            print(f"[{category}] {method}: fit {fit_s:.1f} s, score {score_s:.1f} s", flush=True)

    print()
    print(f"params: {args.params}   (2-core CPU; features extracted once, shared by all methods)")
    print(f"{'category':<14} {'method':<11} {'fit s':>7} {'score s':>8} {'train':>6} {'test':>5} "
          f"{'image AUROC':>11}  main settings")
    for category, method, settings, fit_s, score_s, n_train, n_test, auroc in rows:
        print(f"{category:<14} {method:<11} {fit_s:7.1f} {score_s:8.1f} {n_train:6d} {n_test:5d} "
              f"{auroc:11.4f}  {settings}")


if __name__ == "__main__":
    sys.exit(main())
