"""Every detector and feature setting on the real data sets, over seeds: one table, and JSON.

    python bench/accuracy.py                          # all data sets, every detector, 3 seeds
    python bench/accuracy.py --datasets magnetic-tile --detectors patchcore padim \\
        --setting "lite0-b234: features.layers=[blocks.2,blocks.3,blocks.4]" --seeds 3
    python bench/accuracy.py --data magnetic-tile=/path/to/magnetic-tile ...
    python bench/accuracy.py --report bench/out/accuracy.json   # the table of a saved run

For each data set (Magnetic Tile; ELPV, whose categories are mono and poly; BSData with
patches), each feature setting (``--setting "NAME: KEY=VALUE KEY=VALUE"``, the overrides of
``defectflow run --set``; the params file as it is when none is given), each seed and each
detector, the pipeline's own steps run without Prefect or MLflow: scan, patches,
normalization and features (from the shared cache when already extracted), then train, score
and evaluate in a scratch cache, so every fit and every scoring is timed cold.

A seed draws the train/test split (``dataset.seed``) and seeds the detector (its ``seed``); no
setting, threshold or seed is chosen on test labels. Printed: image AUROC, pixel AUROC, AUPRO
(Magnetic Tile and BSData have masks; ELPV has none), fit seconds and scoring seconds (the
validation and test images), each as mean ± std over the seeds; where a data set has two or
more defect types with masks, a second table gives each type's pixel AUROC. The JSON
(``--json``, written after every measurement, so an interrupted run keeps what it measured)
holds every seed's figures too.

Method settings come from each data set's params file (the ``-all`` file where there is one),
a method it does not list gets its defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

#: data set name -> params file (relative to the repo root); categories come from the data.
DATASETS = {
    "magnetic-tile": "params/magnetic-tile-all.yaml",
    "elpv": "params/elpv-all.yaml",
    "bsdata": "params/bsdata.yaml",
}
TYPE_PREFIX = "pixel_auroc."   # a row's per-defect-type pixel AUROC keys
METRICS = ("image_auroc", "pixel_auroc", "aupro", "fit_s", "score_s")
HEADERS = ("image AUROC", "pixel AUROC", "AUPRO", "fit s", "score s")


@dataclasses.dataclass(frozen=True)
class Setting:
    """A named feature setting: ``--set`` overrides applied to every data set's params."""

    name: str
    overrides: dict

    @classmethod
    def parse(cls, text: str) -> "Setting":
        from defectflow.tasks.params import parse_overrides

        name, _, rest = text.partition(":")  # "NAME" alone: the params as they are
        return cls(name.strip(), parse_overrides(shlex.split(rest)))


def run_overrides(setting: Setting, extra: dict, seed: int, detectors: list[str]) -> dict:
    """The ``--set`` overrides of one measurement: the setting's, the bench's, and the seed
    (the split's and every detector's)."""
    overrides = {**setting.overrides, **extra, "dataset.seed": seed}
    for method in detectors:
        overrides[f"methods.{method}.seed"] = seed
    return overrides


def measure(dataset: str, params_file: Path, setting: Setting, seed: int, detectors: list[str],
            extra: dict, scratch: str):
    """Yield one result row per (category, detector) of one data set, setting and seed."""
    from _pipeline import category_features_without_prefect, prepare_without_prefect

    from defectflow.tasks.params import load_params
    from defectflow.tasks.steps import evaluate_step, score_step, train_step
    from defectflow.tasks.steps.common import category_rows

    params = load_params(params_file, run_overrides(setting, extra, seed, detectors))
    scanned, patches, cache = prepare_without_prefect(params)
    manifest = scanned.manifest.table()
    categories = sorted(manifest["category"].unique())
    for category in categories:
        start = time.perf_counter()
        stats, store = category_features_without_prefect(params, scanned, patches, category, cache)
        features_s = time.perf_counter() - start
        n_images = category_rows(patches, category)["image_id"].nunique()
        for method in detectors:
            method_params = params.methods[method]
            start = time.perf_counter()
            model = train_step(store, patches, scanned.manifest, category, method, method_params,
                               params.features, stats, scratch)
            fit_s = time.perf_counter() - start
            start = time.perf_counter()
            scores = score_step(model, store, patches, scanned.manifest, category, method,
                                params.features, stats, scratch)
            score_s = time.perf_counter() - start
            evaluation = evaluate_step(scores, scanned.manifest, category,
                                       params.evaluation.threshold_quantile, 0, scratch, method)
            metrics = json.loads((Path(evaluation.path) / "metrics.json").read_text())
            row = dict(dataset=f"{dataset}/{category}" if len(categories) > 1 else dataset,
                       setting=setting.name, detector=method, seed=seed,
                       fit_s=fit_s, score_s=score_s, features_s=features_s, images=n_images,
                       **{k: float(metrics.get(k, float("nan")))
                          for k in ("image_auroc", "pixel_auroc", "aupro")},
                       # each defect type's pixel AUROC against the good images
                       **{k: float(v) for k, v in metrics.items() if k.startswith(TYPE_PREFIX)})
            print(f"  {row['dataset']} [{setting.name}] {method} seed {seed}: image AUROC "
                  f"{row['image_auroc']:.4f}, pixel AUROC {row['pixel_auroc']:.4f}, AUPRO "
                  f"{row['aupro']:.4f}, fit {fit_s:.1f} s, score {score_s:.1f} s"
                  + "".join(f", {k.removeprefix(TYPE_PREFIX)} {v:.3f}" for k, v in row.items()
                            if k.startswith(TYPE_PREFIX)), flush=True)
            yield row


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds of each (data set, setting, detector), in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["setting"], row["detector"]), []).append(row)
    summary = []
    for (dataset, setting, detector), members in groups.items():
        entry = dict(dataset=dataset, setting=setting, detector=detector,
                     seeds=[m["seed"] for m in members])
        for metric in METRICS:
            entry[metric] = mean_std([m[metric] for m in members])
        kinds = sorted({k for m in members for k in m if k.startswith(TYPE_PREFIX)})
        if kinds:  # two or more defect types with masks: each one's pixel AUROC
            entry["pixel_auroc_by_type"] = {
                k.removeprefix(TYPE_PREFIX): mean_std([m.get(k, np.nan) for m in members])
                for k in kinds}
        summary.append(entry)
    return summary


def mean_std(values) -> list[float]:
    """[mean, std] of the finite values (NaN, NaN when there are none)."""
    values = np.array(values, dtype=float)
    finite = values[np.isfinite(values)]
    return ([float(finite.mean()), float(finite.std())] if len(finite)
            else [float("nan"), float("nan")])


def format_types_table(summary: list[dict]) -> str:
    """Each defect type's pixel AUROC (its pixels against every good test image's) as mean ±
    std, one row per entry that has them, and the lowest type's mean; "" when none has."""
    entries = [e for e in summary if e.get("pixel_auroc_by_type")]
    if not entries:
        return ""
    kinds = sorted({k for e in entries for k in e["pixel_auroc_by_type"]})
    header = ["data set", "setting", "detector", *kinds, "lowest type"]
    body = []
    for e in entries:
        by_type = e["pixel_auroc_by_type"]
        cells = [f"{by_type[k][0]:.3f} ± {by_type[k][1]:.3f}"
                 if k in by_type and np.isfinite(by_type[k][0]) else "-" for k in kinds]
        means = {k: v[0] for k, v in by_type.items() if np.isfinite(v[0])}
        lowest = min(means, key=means.get) if means else None
        body.append([e["dataset"], e["setting"], e["detector"], *cells,
                     f"{lowest} {means[lowest]:.3f}" if lowest else "-"])
    return markdown_table(header, body)


def markdown_table(header: list, body: list[list]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
             for r in [header, *body]]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def print_tables(summary: list[dict]) -> None:
    print(format_table(summary))
    types = format_types_table(summary)
    if types:
        print("\npixel AUROC per defect type (its pixels against every good test image's), "
              "mean ± std over the seeds:")
        print(types)


def format_table(summary: list[dict]) -> str:
    def cell(metric, pair):
        mean, std = pair
        if not np.isfinite(mean):
            return "-"
        return f"{mean:.1f} ± {std:.1f}" if metric.endswith("_s") else f"{mean:.4f} ± {std:.4f}"

    header = ["data set", "setting", "detector", *HEADERS]
    body = [[e["dataset"], e["setting"], e["detector"], *(cell(m, e[m]) for m in METRICS)]
            for e in summary]
    if len({len(e["seeds"]) for e in summary}) > 1:  # an interrupted run: say how many
        header.append("seeds")
        for row, entry in zip(body, summary):
            row.append(len(entry["seeds"]))
    return markdown_table(header, body)


def params_file_of(dataset: str) -> tuple[Path, str]:
    """(params file, data set name) of a ``--datasets`` entry: a name from DATASETS or a file."""
    if dataset in DATASETS:
        return ROOT / DATASETS[dataset], dataset
    return Path(dataset), Path(dataset).stem


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), metavar="NAME|PARAMS",
                        help=f"{', '.join(DATASETS)}, or a params file (default: the three)")
    parser.add_argument("--detectors", nargs="+",
                        help="default: every detector (the fusion has its own bench)")
    parser.add_argument("--setting", action="append", default=[], metavar='"NAME: KEY=VALUE ..."',
                        help="a feature setting to measure (repeatable); default: the params")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--data", action="append", default=[], metavar="DATASET=PATH",
                        help="where a data set is (default: the params file's dataset.path)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every run, e.g. cache_dir=/tmp/cache")
    parser.add_argument("--json", default=str(ROOT / "bench" / "out" / "accuracy.json"))
    parser.add_argument("--report", metavar="JSON",
                        help="measure nothing: print the table of a JSON this bench wrote "
                             "(also of an interrupted run, with the seeds each row has)")
    args = parser.parse_args(argv)
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        summary = summarize(saved["rows"])
        print(f"{args.report}: {saved['command']} (started {saved['started']})")
        print_tables(summary)
        return dict(saved, summary=summary)

    from defectflow.tasks.methods import METHODS
    from defectflow.tasks.params import parse_overrides

    detectors = args.detectors or list(METHODS)
    unknown = sorted(set(detectors) - set(METHODS))
    if unknown:
        parser.error(f"unknown detector(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    from defectflow.tasks.errors import DefectflowError
    from defectflow.tasks.params import load_params

    where = dict(item.split("=", 1) for item in args.data)
    try:
        settings = [Setting.parse(s) for s in args.setting] or [Setting("params", {})]
        extra = parse_overrides(args.set)
        # Every data set x setting is checked before anything is measured: a bad setting
        # found after an hour of other settings would be an hour lost.
        for dataset in args.datasets:
            params_file, name = params_file_of(dataset)
            data = {"dataset.path": where[name]} if name in where else {}
            for setting in settings:
                load_params(params_file, run_overrides(setting, {**data, **extra}, 0, detectors))
    except DefectflowError as error:
        parser.exit(2, f"bench/accuracy.py: {error}\n")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    started = time.strftime("%Y-%m-%d %H:%M:%S")

    def report(rows: list[dict]) -> dict:
        return dict(command=" ".join(sys.argv), started=started, summary=summarize(rows),
                    rows=rows)

    with tempfile.TemporaryDirectory(prefix="defectflow-accuracy-") as scratch:
        for dataset in args.datasets:
            params_file, dataset = params_file_of(dataset)
            data = {"dataset.path": where[dataset]} if dataset in where else {}
            for setting in settings:
                for seed in range(args.seeds):
                    for row in measure(dataset, params_file, setting, seed,
                                       detectors, {**data, **extra}, scratch):
                        rows.append(row)
                        out.write_text(json.dumps(report(rows), indent=1))
    print(f"\nmean ± std over {args.seeds} seed(s) (split and detector seeded); "
          f"score s: the validation and test images. JSON: {out}")
    result = report(rows)
    print_tables(result["summary"])
    return result


if __name__ == "__main__":
    main()
