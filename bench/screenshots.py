"""The README's pictures: the MLflow runs table comparing methods, and one overlay.

Starts ``mlflow ui`` on a local store (a free port on 127.0.0.1), opens the experiment's
comparison view (the shared view ``defectflow run`` stores on the experiment, see
``tasks/tracking/views.py``) in headless Chromium (Debian's ``chromium``:
``apt-get install -y chromium``) and saves a screenshot; copies one overlay of the
experiment's latest run beside it. Run a pipeline with two or more methods first, e.g.

    defectflow run params/elpv.yaml --set "methods={patchcore: {}, padim: {}}"
    python bench/screenshots.py --store sqlite:///mlflow.db --experiment elpv --out docs

Writes ``<out>/mlflow-runs.png`` and ``<out>/overlay.png``.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import cv2

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--hide-scrollbars"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ui(store: str, port: int, log: Path) -> subprocess.Popen:
    """``mlflow ui`` on ``store``; returns once it answers /health."""
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return process
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.5)
    process.terminate()
    sys.exit(f"mlflow ui did not start; its log: {log}")


def screenshot(url: str, target: Path, size: tuple[int, int], wait_ms: int) -> None:
    """Headless Chromium's screenshot of ``url`` after ``wait_ms`` of (virtual) time."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("chromium not found (Debian: apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="defectflow-chromium-") as profile:
        subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                        f"--window-size={size[0]},{size[1]}",
                        f"--virtual-time-budget={wait_ms}", f"--screenshot={target}", url],
                       check=True, capture_output=True, timeout=300)


def small_png(path: Path, max_width: int) -> None:
    """Re-encode ``path`` at most ``max_width`` wide, with the strongest PNG compression."""
    image = cv2.imread(str(path))
    if image.shape[1] > max_width:
        scale = max_width / image.shape[1]
        image = cv2.resize(image, (max_width, round(image.shape[0] * scale)),
                           interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(path), image, [cv2.IMWRITE_PNG_COMPRESSION, 9])


def latest_overlay(client, experiment_id: str, target: Path) -> str:
    """Copy the best detector's overlay of its highest-scoring defective image (a clear hit,
    its threshold region outlined) of the latest parent run to ``target``; returns its run
    name and file name."""
    import pandas as pd

    from defectflow.tasks.evaluation.examples import overlay_name

    runs = client.search_runs([experiment_id], "tags.method LIKE '%'",
                              order_by=["attributes.start_time DESC"])
    parent = runs[0].data.tags["mlflow.parentRunId"]
    children = sorted((r for r in runs if r.data.tags["mlflow.parentRunId"] == parent),
                      key=lambda r: -r.data.metrics.get("image_auroc", 0))
    with tempfile.TemporaryDirectory() as tmp:
        for child in children:
            names = {Path(a.path).stem: a.path
                     for a in client.list_artifacts(child.info.run_id, "overlays")}
            if not names:
                continue
            scores = pd.read_csv(client.download_artifacts(child.info.run_id, "scores.csv", tmp))
            scores["name"] = scores["image_id"].map(overlay_name)
            drawn = scores[(scores["label"] == 1) & scores["name"].isin(set(names))]
            if len(drawn):
                best = names[drawn.sort_values("score").iloc[-1]["name"]]
                shutil.copyfile(client.download_artifacts(child.info.run_id, best, tmp), target)
                return f"{child.info.run_name}: {best}"
    sys.exit("no overlay of a defective image in the latest run")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="sqlite:///mlflow.db", help="MLflow store URI")
    parser.add_argument("--experiment", default="elpv")
    parser.add_argument("--out", default="docs", help="folder of the PNGs")
    parser.add_argument("--size", default="1900x620", help="browser window, WxH")
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient

    from defectflow.tasks.tracking.views import ui_hint

    client = MlflowClient(tracking_uri=args.store)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        sys.exit(f"no experiment {args.experiment!r} in {args.store}: run defectflow first")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    ui = start_ui(args.store, port, out / "mlflow-ui.log")
    try:
        # The link the CLI prints (tasks/tracking/views.py ui_hint), on this port.
        url = ui_hint(f"http://127.0.0.1:{port}", experiment.experiment_id).split(" ")[-1]
        width, height = (int(v) for v in args.size.split("x"))
        screenshot(url, out / "mlflow-runs.png", (width, height), wait_ms=20000)
        small_png(out / "mlflow-runs.png", 1900)
        print(f"{out / 'mlflow-runs.png'}: {url}")
    finally:
        ui.terminate()
        ui.wait(timeout=30)
    (out / "mlflow-ui.log").unlink(missing_ok=True)
    source = latest_overlay(client, experiment.experiment_id, out / "overlay.png")
    small_png(out / "overlay.png", 1200)
    print(f"{out / 'overlay.png'}: {source}")


if __name__ == "__main__":
    main()
