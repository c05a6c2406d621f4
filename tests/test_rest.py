"""REST scoring: a real ``mlflow models serve`` process on a registered model answers JSON rows
of base64-encoded PNG files with the pyfunc's score, threshold and verdict (map on request)."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pandas as pd
import pytest

from conftest import make_folder_dataset, wait_for_http
from defectflow.cli import main
from defectflow.tasks.methods import PaDiM
from test_flow import write_params

MODEL = f"dfr-generated-product-{PaDiM.name}"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rest")
    data = make_folder_dataset(tmp / "product", n_good=30, n_bad=8)
    params = write_params(tmp, data, registry={"enabled": True, "name_prefix": "dfr"},
                          methods={PaDiM.name: {"n_channels": 40}})
    assert main(["run", str(params), "--quiet"]) == 0
    images = sorted((data / "good").glob("*.png"))[-3:] + sorted((data / "blob").glob("*.png"))[:3]
    return tmp, f"sqlite:///{tmp / 'mlflow.db'}", images


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.fixture(scope="module")
def server(registered):
    tmp, uri, _ = registered
    port = _free_port()
    # `mlflow models serve` execs `uvicorn` from PATH: a venv that borrows the system's
    # packages would find the system's uvicorn and interpreter (and another defectflow).
    # This interpreter's, whatever the environment's layout.
    shims = tmp / "bin"
    shims.mkdir(exist_ok=True)
    (shims / "uvicorn").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m uvicorn "$@"\n')
    (shims / "uvicorn").chmod(0o755)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri,
           "PATH": f"{shims}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = open(tmp / "serve.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}@champion", "--env-manager",
         "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base}/ping", process, tmp / "serve.log", timeout=300)
        yield base
    finally:
        # The server's own process group (gunicorn/uvicorn and its workers), nothing else.
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def test_served_model_scores_base64_images_as_the_pyfunc(registered, server):
    tmp, uri, images = registered
    from defectflow.tasks.tracking import load_model

    rows = [{"image_b64": base64.b64encode(p.read_bytes()).decode(), "name": p.name}
            for p in images]
    status, answer = _post(f"{server}/invocations", {"dataframe_records": rows})
    assert status == 200, answer
    predictions = pd.DataFrame(answer["predictions"])
    assert list(predictions.columns) == ["image", "score", "threshold", "verdict"]
    assert list(predictions["image"]) == [p.name for p in images]

    pyfunc, _ = load_model(f"{MODEL}@champion", uri)
    reference = pyfunc.predict([str(p) for p in images])
    np.testing.assert_allclose(predictions["score"], reference["score"], rtol=1e-6)
    assert list(predictions["verdict"]) == list(reference["verdict"])
    assert set(predictions["verdict"]) == {"good", "defective"}
    assert predictions["threshold"].nunique() == 1
    assert predictions["threshold"][0] == pytest.approx(reference["threshold"][0])


def test_served_model_returns_the_map_on_request_and_rejects_bad_rows(registered, server):
    _, _, images = registered
    image = images[-1]
    row = {"image_b64": base64.b64encode(image.read_bytes()).decode(), "with_map": True}
    status, answer = _post(f"{server}/invocations", {"dataframe_records": [row]})
    assert status == 200, answer
    anomaly_map = np.asarray(answer["predictions"][0]["anomaly_map"], dtype=np.float32)
    assert anomaly_map.shape == (64, 64) and anomaly_map.max() > 0

    status, answer = _post(f"{server}/invocations",
                           {"dataframe_records": [{"image_b64": "not base64!"}]})
    assert status >= 400 and "not valid base64" in json.dumps(answer)
