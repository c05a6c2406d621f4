"""Scheduled training: ``defectflow serve`` serves the pipeline as a Prefect deployment, and
a real Prefect server's scheduler starts a run of it that completes and is tracked."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import make_folder_dataset
from defectflow.cli import main


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _api(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Signal the process group we started (the process and its children), then make sure."""
    if process.poll() is None:
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    try:  # children that outlived their parent, in the same group
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _env(home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1", PYTHONWARNINGS="ignore", **extra)
    return env


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """``prefect server start`` (API + scheduler services, no UI) with a private home, by
    way of defectflow.prefect_server: its scheduler also works with SQLAlchemy 2.1."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    log = open(home / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "defectflow.prefect_server", "--host", "127.0.0.1",
         "--port", str(port), "--no-ui"],
        env=_env(home), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                _api(f"{url}/health")
                break
            except (urllib.error.URLError, OSError):
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("prefect server did not start:\n"
                                + (home / "server.log").read_text()[-2000:])
                time.sleep(0.5)
        yield url
    finally:
        _stop(process)
        log.close()


def test_serve_runs_the_pipeline_on_an_interval_schedule(prefect_server, tmp_path):
    data = make_folder_dataset(tmp_path / "product", n_good=16, n_bad=4)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "dataset": {"layout": "folder", "path": str(data), "name": "scheduled"},
        "features": {"input_size": 64},
        "methods": {"patchcore": {"coreset_ratio": 0.5}},
        "evaluation": {"overlays": 0, "plots": False},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "cache_dir": str(tmp_path / "cache")}))
    log = open(tmp_path / "serve.log", "w")
    serving = subprocess.Popen(
        [sys.executable, "-m", "defectflow.cli", "serve", str(params), "--interval", "5",
         "--name", "every-5s", "--set", "evaluation.threshold_quantile=0.95"],
        env=_env(tmp_path / "prefect-home", PREFECT_API_URL=prefect_server,
                 PREFECT_RUNNER_POLL_FREQUENCY="1"),
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    states: list[str] = []
    try:
        deadline = time.monotonic() + 240
        deployment = None
        while time.monotonic() < deadline and serving.poll() is None:
            time.sleep(2)
            try:
                deployment = deployment or _api(
                    f"{prefect_server}/deployments/name/defectflow-training/every-5s")
            except urllib.error.HTTPError:
                continue  # not created yet
            runs = _api(f"{prefect_server}/flow_runs/filter",
                        {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}})
            states = [r["state_type"] for r in runs]
            if "COMPLETED" in states or {"FAILED", "CRASHED"} & set(states):
                break
    finally:
        _stop(serving, signal.SIGINT)
        log.close()
    output = (tmp_path / "serve.log").read_text()
    assert "COMPLETED" in states, f"states {states}; serve output:\n{output[-3000:]}"
    assert deployment["schedules"][0]["schedule"]["interval"] == 5
    assert deployment["parameters"] == {
        "params_path": str(params), "overrides": {"evaluation.threshold_quantile": 0.95}}

    # The scheduled run trained and tracked the pipeline, with the --set override applied.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("scheduled").experiment_id])
    child = next(r for r in runs if r.data.tags.get("mlflow.parentRunId"))
    assert child.data.metrics["image_auroc"] >= 0.9
    assert child.data.params["evaluation.threshold_quantile"] == "0.95"


def test_serve_reports_bad_input_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    data = make_folder_dataset(tmp_path / "product", n_good=4, n_bad=1)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"dataset": {"layout": "folder", "path": str(data)}}))
    cases = [(["--cron", "0 25 * * *"], "Invalid cron"),
             (["--interval", "0"], "--interval must be a positive"),
             (["--interval", "60", "--set", "execution.task_runner=spark"],
              "execution.task_runner"),
             (["--interval", "60"], "needs a Prefect server with a scheduler")]
    for extra, expected in cases:
        assert main(["serve", str(params), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("defectflow: error:") and expected in err[0]
