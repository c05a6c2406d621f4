"""Cold versus cached wall time of the same ``defectflow run``, in one process tree.

Runs the CLI twice as child processes of this script, with a fresh feature
cache, a fresh Prefect home (so Prefect's result cache starts empty) and a
fresh MLflow store, and prints both wall times and their ratio.

    python bench/rerun.py                       # ELPV, params/elpv.yaml
    python bench/rerun.py params/magnetic-tile.yaml --set features.input_size=160
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed_run(params: str, overrides: list[str], env: dict) -> tuple[float, str]:
    command = [sys.executable, "-m", "defectflow.cli", "run", params, "--quiet"]
    for item in overrides:
        command += ["--set", item]
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"run failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return seconds, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("params", nargs="?", default=str(ROOT / "params" / "elpv.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="defectflow-rerun-") as tmp:
        env = {**os.environ, "PREFECT_HOME": str(Path(tmp) / "prefect"),
               "PYTHONWARNINGS": "ignore"}
        overrides = [f"cache_dir={Path(tmp) / 'cache'}",
                     f"tracking.uri=sqlite:///{Path(tmp) / 'mlflow.db'}", *args.set]
        cold, cold_out = timed_run(args.params, overrides, env)
        cached, cached_out = timed_run(args.params, overrides, env)

    print(cold_out.strip())
    print()
    print(f"params: {args.params} {' '.join(args.set)}")
    print(f"cold run:    {cold:8.1f} s")
    print(f"cached run:  {cached:8.1f} s   (every step cached: "
          f"{'yes' if 'every step cached' in cached_out else 'NO'})")
    print(f"ratio cached/cold: {cached / cold:.3f}  (target <= 0.100)")


if __name__ == "__main__":
    main()
