"""Cold versus cached wall time of the same ``defectflow run``, in one process tree.

Runs the CLI as child processes of this script, each pair with a fresh
feature cache, a fresh Prefect home (Prefect's result cache starts empty) and
a fresh MLflow store, and prints the wall times and their ratio for the two
ways Prefect is run:

- ``ephemeral``: nothing else running; every CLI call starts Prefect's
  temporary local API server (~8 s on 2 cores, overlapped with our imports);
- ``server``: a Prefect server is already running (``prefect server start``,
  started here before timing), as at a plant that schedules runs.

    python bench/rerun.py                       # ELPV, params/elpv.yaml
    python bench/rerun.py params/magnetic-tile.yaml --mode ephemeral
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed_run(params: str, overrides: list[str], env: dict) -> tuple[float, str]:
    command = [sys.executable, "-m", "defectflow.cli", "run", params]
    for item in overrides:
        command += ["--set", item]
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"run failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return seconds, result.stdout


def start_prefect_server(env: dict) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
         "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    sys.exit("prefect server did not start within 180 s")


def measure(mode: str, params: str, extra: list[str]) -> tuple[float, float, str, bool]:
    with tempfile.TemporaryDirectory(prefix=f"defectflow-rerun-{mode}-") as tmp:
        env = {**os.environ, "PREFECT_HOME": str(Path(tmp) / "prefect"),
               "PYTHONWARNINGS": "ignore", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "DO_NOT_TRACK": "1"}
        env.pop("PREFECT_API_URL", None)
        server = None
        if mode == "server":
            server, env["PREFECT_API_URL"] = start_prefect_server(env)
        try:
            overrides = [f"cache_dir={Path(tmp) / 'cache'}",
                         f"tracking.uri=sqlite:///{Path(tmp) / 'mlflow.db'}", *extra]
            cold, cold_out = timed_run(params, overrides, env)
            cached, cached_out = timed_run(params, overrides, env)
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=30)
    recomputed = [line.strip() for line in cached_out.splitlines()
                  if line.startswith("  ") and " ran " in line]
    for line in recomputed:
        print(f"[{mode}] not from cache on the rerun: {line}")
    return cold, cached, cold_out, "every step cached" in cached_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("params", nargs="?", default=str(ROOT / "params" / "elpv.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--mode", choices=["ephemeral", "server", "both"], default="ephemeral")
    args = parser.parse_args()
    modes = ["ephemeral", "server"] if args.mode == "both" else [args.mode]

    rows = []
    for mode in modes:
        cold, cached, cold_out, all_cached = measure(mode, args.params, args.set)
        print(f"--- {mode}: output of the cold run")
        print(cold_out.strip())
        rows.append((mode, cold, cached, all_cached))

    print()
    print(f"params: {args.params} {' '.join(args.set)}")
    print(f"{'prefect':<10} {'cold s':>8} {'cached s':>9} {'cached/cold':>12} {'all cached':>11}")
    for mode, cold, cached, all_cached in rows:
        print(f"{mode:<10} {cold:8.1f} {cached:9.1f} {cached / cold:12.3f} "
              f"{'yes' if all_cached else 'NO':>11}")
    print("target: cached/cold <= 0.100")


if __name__ == "__main__":
    main()
