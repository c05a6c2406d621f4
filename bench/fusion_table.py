"""The fusion against its best input, side by side, on Magnetic Tile and ELPV (mono, poly).

    python bench/fusion_table.py [--variants auto,paper] [--magnetic-tile PATH]   (repo root)

For each data set, ``bench/fusion.py`` on the detectors a `defectflow run` of
``params/magnetic-tile-all.yaml`` / ``params/elpv-all.yaml`` cached (run those first),
over the params' 10 seeds; then one table: every fusion variant's image AUROC (mean ± std
over seeds) next to the best single detector's on the same images (its own image score or
its anomaly-map maximum, whichever ranks better: "(own)" / "(max)").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fusion as fusion_bench  # noqa: E402  (bench/fusion.py)

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="auto,paper")
    parser.add_argument("--magnetic-tile", default=None,
                        help="the Magnetic Tile folder (default: the params' dataset.path)")
    args = parser.parse_args(argv)
    where = ["--set", f"dataset.path={args.magnetic_tile}"] if args.magnetic_tile else []
    runs = [("magnetic-tile", ["params/magnetic-tile-all.yaml", *where]),
            ("elpv", ["params/elpv-all.yaml"])]
    rows = []
    for name, command in runs:
        results = fusion_bench.main([str(ROOT / command[0]), *command[1:],
                                     "--variants", args.variants])
        for category, figures in results.items():
            # A detector alone: its own image score, or its map maximum if that ranks better.
            alone = {k: v for k, v in figures.items() if k.endswith((" (own)", " (max)"))}
            best = max(alone, key=lambda d: alone[d][0])
            rows.append((f"{name}/{category}", best, alone[best],
                         [figures[v] for v in args.variants.split(",")]))
    variants = args.variants.split(",")
    print("\nimage AUROC, mean ± std over 10 seeds, each seed on the images its fusion did "
          "not train on")
    header = f"{'data set':<28}{'best detector alone':<34}" + "".join(
        f"{'fusion ' + v:<20}" for v in variants)
    print(header)
    print("-" * len(header))
    for where, best, (mean, std), fused in rows:
        cells = "".join(f"{m:.4f} ± {s:.4f}{' ' * 5}" for m, s in fused)
        print(f"{where:<28}{best + f' {mean:.4f} ± {std:.4f}':<34}{cells}")


if __name__ == "__main__":
    main()
