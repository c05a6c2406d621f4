"""Fusion variants on a run's cached detector scores and maps, over the same seeds.

    python bench/fusion.py params/magnetic-tile-all.yaml [--set KEY=VALUE ...]
        [--variants paper,auto,...] [--seeds 10] [--categories mono,poly]

Runs the pipeline's steps 1-6 without Prefect (everything is found in the cache that a
`defectflow run` of the same params wrote: nothing is retrained as long as the code and
params are the same), then for each category fits every fusion variant on SegAD's
supervised splits (held-out goods + ``fusion.n_defective`` labelled defects per seed) and
prints image AUROC mean ± std over the seeds, with each detector alone (its own image
score, and its map maximum) on the very same evaluation images of each seed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pipeline import category_features_without_prefect, prepare_without_prefect  # noqa: E402

from defectflow.tasks import fusion as segad  # noqa: E402
from defectflow.tasks.fusion.choice import DEFAULT_TOLERANCE, choose_and_fit  # noqa: E402
from defectflow.tasks.fusion.stacking import (STACKER_C, fit_stacker, score_columns,  # noqa: E402
                                              score_frame)
from defectflow.tasks.params import FusionParams, load_params  # noqa: E402
from defectflow.tasks.steps import score_step, train_step  # noqa: E402
from defectflow.tasks.steps.fuse import fusion_segments, maps_of  # noqa: E402


def load_category(params, scanned, patches, cache, category):
    """The category's images scored by every detector: ids, labels, splits, maps, scores."""
    stats, store = category_features_without_prefect(params, scanned, patches, category, cache)
    refs = {}
    for method, method_params in params.methods.items():
        model = train_step(store, patches, scanned.manifest, category, method, method_params,
                           params.features, stats, cache)
        refs[method] = score_step(model, store, patches, scanned.manifest, category, method,
                                  params.features, stats, cache)
    detectors = sorted(refs)
    tables = {m: pd.read_parquet(Path(refs[m].path) / "scores.parquet") for m in detectors}
    ids = sorted(set.intersection(*(set(t["image_id"]) for t in tables.values())))
    man = scanned.manifest.table().set_index("image_id")
    maps = [maps_of(refs[m], tables[m], ids) for m in detectors]
    own = [tables[m].set_index("image_id").loc[ids, "score"].to_numpy() for m in detectors]
    return dict(ids=ids, man=man, detectors=detectors, maps=maps, own=own,
                labels=man.loc[ids, "label"].astype(int), splits=man.loc[ids, "split"].tolist())


def standardized_maps(maps, ids, splits):
    """Each detector's maps in units of its held-out goods' pixels: (map - mean) / std."""
    goods = [i for i, s in enumerate(splits) if s == "val"]
    out = []
    for m in maps:
        g = np.asarray(m[goods], dtype=np.float32)
        out.append(((np.asarray(m, dtype=np.float32) - g.mean()) / max(g.std(), 1e-12)))
    return out


def features_for(data, params, segmentation="grid", k=None, maps=None, detectors=None):
    detectors = detectors or data["detectors"]
    index = [data["detectors"].index(d) for d in detectors]
    maps = maps or data["maps"]
    fusion = FusionParams(**{**params.fusion.model_dump(), "segmentation": segmentation,
                             "segments": k or params.fusion.segments})
    segments = fusion_segments(fusion, data["man"], data["category"], maps[0].shape[-1])
    return segad.feature_frame([maps[i] for i in index], segments, data["ids"], detectors)


def train_auroc(frame, labels, train, column):
    return roc_auc_score(labels.loc[train], frame.loc[train, column])


def run_variants(data, params, variants, seeds):
    detectors = data["detectors"]
    labels = data["labels"]
    own = score_frame(data["own"], data["ids"], detectors)
    paper = features_for(data, params)
    frames = {"paper": paper}
    splits = segad.supervised_splits(data["ids"], labels.tolist(), data["splits"],
                                     n_defective=params.fusion.n_defective, seeds=seeds)
    kind, jobs = params.fusion.classifier, params.fusion.n_jobs

    def forest(frame, split, columns=None):
        columns = list(columns if columns is not None else frame.columns)
        train = list(split.train_ids)
        model = segad.fit_classifier(frame.loc[train, columns].to_numpy(np.float32),
                                     labels.loc[train].to_numpy(), kind=kind, seed=split.seed,
                                     n_jobs=jobs)
        return segad.margin_scores(
            model, frame.loc[list(split.eval_ids), columns].to_numpy(np.float32))

    def frame_of(name):
        if name not in frames:
            if name == "paper+own":
                frames[name] = pd.concat([paper, own], axis=1)
            elif name == "std-maps":
                frames[name] = features_for(data, params, maps=standardized_maps(
                    data["maps"], data["ids"], data["splits"]))
            elif name.startswith("grid") or name.startswith("slic"):
                seg = "grid" if name.startswith("grid") else "superpixels"
                frames[name] = features_for(data, params, seg, int(name[4:]))
        return frames[name]

    def variant(name, split):
        train, evaluate = list(split.train_ids), list(split.eval_ids)
        y = labels.loc[train].to_numpy()
        both = pd.concat([paper, own], axis=1)
        if name in ("paper", "paper+own", "std-maps") or name[:4] in ("grid", "slic"):
            return forest(frame_of(name), split), ""
        if name == "own-not-max":  # the map maximum column replaced by the own score
            frame = paper.copy()
            for d in detectors:
                frame[f"{d}.image_score"] = own[f"{d}.score"]
            return forest(frame, split), ""
        if name.startswith("top"):  # the n detectors best on the training split, their features
            n = int(name[3:])
            ranked = sorted(detectors, key=lambda d: -train_auroc(own, labels, train,
                                                                   f"{d}.score"))[:n]
            columns = [c for c in both.columns if c.split(".")[0] in ranked]
            return forest(both, split, columns), ",".join(ranked)
        if name.startswith("stacker"):  # stacker[-c<C>]: the default C is the pipeline's
            c = float(name.split("-c")[1]) if "-c" in name else STACKER_C
            fitted = fit_stacker(own.loc[train], y, score_columns(detectors), c=c)
            return fitted.decision(own.loc[evaluate]), ",".join(
                col.split(".")[0] for col in fitted.columns)
        if name == "zmean":
            goods = own.loc[[i for i in train if labels[i] == 0]]
            z = (own.loc[evaluate] - goods.mean()) / goods.std().clip(lower=1e-12)
            return z.mean(axis=1).to_numpy(), ""
        if name == "best-train":
            best = max(detectors, key=lambda d: train_auroc(own, labels, train, f"{d}.score"))
            return own.loc[evaluate, f"{best}.score"].to_numpy(), best
        if name.startswith("auto"):  # auto[-noown][-tolX]; "auto" is the pipeline's default
            forest_columns = list(paper.columns) + (score_columns(detectors)
                                                     if "-noown" not in name else [])
            tolerance = float(name.split("-tol")[1]) if "-tol" in name else DEFAULT_TOLERANCE
            fitted = choose_and_fit(both.loc[train], y, dict(zip(detectors,
                                                                score_columns(detectors))),
                                    forest_columns, kind=kind, seed=split.seed, n_jobs=jobs,
                                    tolerance=tolerance)
            return fitted.score(both.loc[evaluate]), fitted.choice.chosen
        raise SystemExit(f"unknown variant {name!r}")

    rows, notes = [], {}
    for split in splits:
        y_eval = labels.loc[list(split.eval_ids)].to_numpy()
        row = {"seed": split.seed, "n_eval": len(split.eval_ids)}
        for d in detectors:
            row[f"{d} (own)"] = roc_auc_score(y_eval, own.loc[list(split.eval_ids),
                                                              f"{d}.score"])
            row[f"{d} (max)"] = roc_auc_score(y_eval, paper.loc[list(split.eval_ids),
                                                                f"{d}.image_score"])
        for name in variants:
            started = time.perf_counter()
            scores, note = variant(name, split)
            row[name] = roc_auc_score(y_eval, scores)
            notes.setdefault(name, []).append(note)
            row[f"_{name}_s"] = time.perf_counter() - started
        rows.append(row)
        print(f"  seed {split.seed}: " + "  ".join(
            f"{k} {v:.3f}" for k, v in row.items() if k in variants), flush=True)
    return pd.DataFrame(rows), notes


def summarize(category, table, notes, variants):
    metrics = [c for c in table.columns if c not in ("seed", "n_eval") and not c.startswith("_")]
    print(f"\n== {category}: image AUROC over {len(table)} seeds, on each seed's "
          f"{int(table['n_eval'].iloc[0])} evaluation images")
    for column in metrics:
        timing = (f"  ({table[f'_{column}_s'].mean():.1f} s/seed)"
                  if f"_{column}_s" in table else "")
        chosen = ""
        if column in notes and any(notes[column]):
            counts = pd.Series(notes[column]).value_counts()
            chosen = "  chose: " + ", ".join(f"{k} x{v}" for k, v in counts.items())
        print(f"  {column:<22} {table[column].mean():.4f} ± {table[column].std(ddof=1):.4f}"
              f"{timing}{chosen}")
    return {c: (table[c].mean(), table[c].std(ddof=1)) for c in metrics}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("params")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--variants", default="paper,auto")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--categories", default=None)
    parser.add_argument("--methods", default=None, help="only these detectors (comma-separated)")
    args = parser.parse_args(argv)
    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    params = load_params(args.params, overrides)
    if args.methods:
        params = params.model_copy(update={"methods": {
            m: p for m, p in params.methods.items() if m in args.methods.split(",")}})
    seeds = range(params.fusion.seed, params.fusion.seed + (args.seeds or params.fusion.seeds))
    variants = args.variants.split(",")
    scanned, patches, cache = prepare_without_prefect(params)
    categories = sorted(scanned.manifest.table()["category"].unique())
    if args.categories:
        categories = [c for c in categories if c in args.categories.split(",")]
    results = {}
    for category in categories:
        data = load_category(params, scanned, patches, cache, category)
        data["category"] = category
        print(f"{params.dataset_name}/{category}: {len(data['ids'])} images, detectors "
              f"{data['detectors']}", flush=True)
        table, notes = run_variants(data, params, variants, seeds)
        results[category] = summarize(category, table, notes, variants)
    return results


if __name__ == "__main__":
    main()
