"""Do the features hold each defect type? A supervised probe beside the detectors' distances.

    python bench/separability.py                                  # Magnetic Tile, seed 0
    python bench/separability.py --datasets params/my-data.yaml --seed 1
    python bench/separability.py --setting "deep: features.layers=[blocks.4,blocks.6]"

A detector's map is a distance or a density on frozen features: when it misses a defect type,
either the features do not tell that type from good surface, or they do and the distance does
not use it. This bench tells the two apart. On the grid every detector reads
(``features.detector_layers``, PatchCore's 3x3 local average), for each defect type of the
test split whose images have masks:

- **probe**: a logistic regression trained on the masks of *other* images of the same type
  (5-fold cross-validation grouped by image over that type's test images; negatives also
  include good *train* positions, never a good test image). What a map on these features
  could reach with labels: a bound to compare against, not a detector.
- **K-shot probe** (``--shots``): the same trained on K images of that type only (mean of 3
  draws), scored on the rest: what a few labelled defects would buy.
- **kNN** and **Mahalanobis**: unsupervised distances fitted on good train positions only
  (nearest neighbour among up to 50,000 of them, as PatchCore without its coreset; one
  Gaussian over all positions).

Each as pooled AUROC (the type's positions against every good test image's, like the
pipeline's per-type pixel AUROC, on the feature grid) and within-image AUROC (mean over the
type's images that have both labels: does the score find the defect inside its own image).
Whole-image data sets only (``patches.size: null``). A mask cell is defective when at least
half of it is. JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

FOLDS = 5
KNN_BANK = 50_000
SHOT_DRAWS = 3
MASK_CELL = 8     # mask pixels per grid cell side before the cell's defect fraction is taken
SCORES = ("probe", "knn", "mahalanobis")


def fail(message: str) -> None:
    """Bad input: one line naming the data set or setting, exit 2."""
    print(f"separability.py: {message}", file=sys.stderr)
    raise SystemExit(2)


def grid_features(params, seed: int):
    """(vectors (n, h, w, D) of the category's rows, rows, manifest) with the split of ``seed``."""
    from _pipeline import category_features_without_prefect, prepare_without_prefect

    from defectflow.tasks.methods.patchcore import embed
    from defectflow.tasks.scoring import patch_set
    from defectflow.tasks.steps.common import category_rows, image_paths

    scanned, patches, cache = prepare_without_prefect(params)
    manifest = scanned.manifest.table()
    categories = sorted(manifest["category"].unique())
    if len(categories) != 1:
        fail(f"{params.dataset.path}: {len(categories)} categories; pick one with "
             f"--set dataset.category=NAME")
    stats, store = category_features_without_prefect(params, scanned, patches, categories[0],
                                                     cache)
    rows = category_rows(patches, categories[0])
    every = patch_set(store, rows, np.ones(len(rows), bool), image_paths(scanned.manifest),
                      params.features, stats)
    layers = params.features.detector_layers
    parts = [embed(maps, layers, "zero_padded").numpy()
             for _, maps in every.feature_chunks(layers, chunk_size=64)]
    return np.concatenate(parts), rows, manifest


def grid_masks(rows, manifest, grid_hw) -> np.ndarray:
    """(n, h, w) bool: a cell is defective when at least half of it is (good images: none)."""
    from defectflow.tasks.evaluation.localization import mask_crop

    paths = dict(zip(manifest["image_id"], manifest["mask_path"]))
    sizes = dict(zip(manifest["image_id"], zip(manifest["height"], manifest["width"])))
    h, w = grid_hw
    out = np.zeros((len(rows), h, w), bool)
    for i, row in enumerate(rows.itertuples(index=False)):
        path = paths.get(row.image_id)
        if row.label and isinstance(path, str):
            fine = mask_crop(row, path, sizes[row.image_id], (h * MASK_CELL, w * MASK_CELL))
            out[i] = fine.reshape(h, MASK_CELL, w, MASK_CELL).mean(axis=(1, 3)) >= 0.5
    return out


def probe_scores(x_train, y_train, x_test) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000,
                                                               class_weight="balanced"))
    return model.fit(x_train, y_train).decision_function(x_test)


def aurocs(scores, masks, good_test, images) -> tuple[float, float]:
    """(pooled AUROC of ``images``' cells against every good test cell, mean within-image)."""
    from sklearn.metrics import roc_auc_score

    values = np.concatenate([scores[images].ravel(), scores[good_test].ravel()])
    labels = np.concatenate([masks[images].ravel(), masks[good_test].ravel()])
    within = [roc_auc_score(masks[i].ravel(), scores[i].ravel())
              for i in images if 0 < masks[i].mean() < 1]
    return float(roc_auc_score(labels, values)), float(np.mean(within)) if within else np.nan


def measure(vectors, masks, rows, types, seed: int, shots: list[int]) -> list[dict]:
    from sklearn.model_selection import GroupKFold

    n, h, w, dim = vectors.shape
    flat = vectors.reshape(n, -1, dim)
    split, label = rows["split"].to_numpy(), rows["label"].to_numpy()
    train_good = np.flatnonzero((split == "train") & (label == 0))
    good_test = np.flatnonzero((split == "test") & (label == 0))
    defective = np.flatnonzero((split == "test") & (label == 1) & masks.any(axis=(1, 2)))
    if not len(defective) or not len(good_test) or not len(train_good):
        fail("needs good train images, good test images and defective test images with masks")
    rng = np.random.default_rng(seed)
    bank = flat[train_good].reshape(-1, dim)
    bank = bank[rng.choice(len(bank), min(len(bank), KNN_BANK), replace=False)]
    negatives = bank[rng.choice(len(bank), min(len(bank), 20_000), replace=False)]
    scores = {name: np.zeros((n, h, w), np.float32) for name in ("knn", "mahalanobis")}

    # Unsupervised references, fitted on good train positions only.
    from defectflow.tasks.methods.flat_search import TorchFlatIndex

    mean = bank.mean(axis=0)
    precision = np.linalg.inv(np.cov(bank, rowvar=False) + 1e-3 * np.eye(dim))
    index = TorchFlatIndex(bank, "cpu")  # PatchCore's exact search, as without a coreset
    for i in np.concatenate([defective, good_test]):
        centred = flat[i] - mean
        scores["mahalanobis"][i] = np.einsum("pd,de,pe->p", centred, precision,
                                             centred).reshape(h, w)
        squared, _ = index.search(flat[i])
        scores["knn"][i] = np.sqrt(squared[:, 0]).reshape(h, w)

    def fit_score(train_images, test_images):
        x = np.concatenate([flat[train_images].reshape(-1, dim), negatives])
        y = np.concatenate([masks[train_images].ravel(), np.zeros(len(negatives), bool)])
        return probe_scores(x, y, flat[test_images].reshape(-1, dim)).reshape(-1, h, w)

    def probed(images):
        """The probe of one type: each image scored by a model that never saw it (grouped
        folds), good test images by the mean of the fold models (none saw them either)."""
        probe = np.zeros((n, h, w), np.float32)
        folds = GroupKFold(n_splits=min(FOLDS, len(images)))
        for train_part, test_part in folds.split(images, groups=images):
            probe[images[test_part]] = fit_score(images[train_part], images[test_part])
            probe[good_test] += fit_score(images[train_part], good_test) / folds.get_n_splits()
        return probe

    results = []
    for kind in sorted(set(types[defective])):
        images = defective[types[defective] == kind]
        row = dict(type=kind, images=int(len(images)))
        if len(images) > 1:  # one image cannot be cross-validated
            row["probe_pooled"], row["probe_within"] = aurocs(probed(images), masks,
                                                              good_test, images)
        for name, values in scores.items():
            row[f"{name}_pooled"], row[f"{name}_within"] = aurocs(values, masks, good_test,
                                                                  images)
        for k in shots:
            if k >= len(images):
                continue
            draws = []
            for draw in range(SHOT_DRAWS):
                picked = np.random.default_rng(seed * 100 + draw).permutation(images)
                trained, rest = picked[:k], picked[k:]
                shot = np.zeros((n, h, w), np.float32)
                shot[rest] = fit_score(trained, rest)
                shot[good_test] = fit_score(trained, good_test)
                draws.append(aurocs(shot, masks, good_test, rest))
            row[f"probe_{k}shot_pooled"] = float(np.mean([d[0] for d in draws]))
            row[f"probe_{k}shot_within"] = float(np.mean([d[1] for d in draws]))
        results.append(row)
        print("  " + ", ".join(f"{key} {value:.3f}" if isinstance(value, float) else
                               f"{key} {value}" for key, value in row.items()), flush=True)
    return results


def format_table(results: list[dict], shots: list[int]) -> str:
    columns = [*SCORES] + [f"probe_{k}shot" for k in shots]
    head = ["type", "images"] + [f"{c} pooled / within" for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results:
        cells = [row["type"], str(row["images"])]
        for c in columns:
            pooled = row.get(f"{c}_pooled")
            cells.append("-" if pooled is None else
                         f"{pooled:.3f} / {row[f'{c}_within']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="magnetic-tile", metavar="NAME|PARAMS",
                        help="a data set of bench/accuracy.py or a params file")
    parser.add_argument("--setting", default="params", metavar='"NAME: KEY=VALUE ..."',
                        help="a feature setting, as bench/accuracy.py's (default: the params)")
    parser.add_argument("--seed", type=int, default=0, help="the split's seed (dataset.seed)")
    parser.add_argument("--shots", type=int, nargs="*", default=[5, 20],
                        help="K-shot probes to run (default: 5 20)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override, e.g. cache_dir=/tmp/cache")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if any(k < 1 for k in args.shots):
        fail(f"--shots must be >= 1, got {args.shots}")

    from accuracy import Setting, params_file_of

    from defectflow.tasks.errors import DefectflowError
    from defectflow.tasks.params import load_params, parse_overrides

    params_file, name = params_file_of(args.datasets)
    try:
        setting = Setting.parse(args.setting)
        params = load_params(params_file, {**setting.overrides, **parse_overrides(args.set),
                                           "dataset.seed": args.seed})
    except DefectflowError as error:
        fail(str(error))
    if params.patches.size is not None:
        fail(f"{params_file}: patches.size is {params.patches.size}; this bench reads whole "
             "images (patches.size: null)")
    try:
        vectors, rows, manifest = grid_features(params, args.seed)
    except DefectflowError as error:   # e.g. a layer the backbone does not have
        fail(str(error))
    masks = grid_masks(rows, manifest, vectors.shape[1:3])
    types = rows["image_id"].map(dict(zip(manifest["image_id"],
                                          manifest["defect_type"]))).to_numpy()
    print(f"{name} [{setting.name}] seed {args.seed}: {vectors.shape[1]} x {vectors.shape[2]} "
          f"grid, {vectors.shape[3]} channels")
    results = measure(vectors, masks, rows, types, args.seed, args.shots)
    print(format_table(results, args.shots))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(command=" ".join(sys.argv), dataset=name,
                                                   setting=setting.name, seed=args.seed,
                                                   results=results), indent=1))
    return results


if __name__ == "__main__":
    main()
