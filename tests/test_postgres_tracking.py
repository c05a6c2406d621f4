"""MLflow's tracking URI: params > MLFLOW_TRACKING_URI > sqlite:///mlflow.db, and a pipeline
run tracked in a real PostgreSQL server started here (skipped where none can be started)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from conftest import make_folder_dataset
from defectflow.cli import main
from defectflow.tasks.params import PipelineParams, TrackingParams, flatten


def test_tracking_uri_precedence(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert TrackingParams().resolved_uri() == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://team@db:5432/mlflow")
    assert TrackingParams().resolved_uri() == "postgresql://team@db:5432/mlflow"
    assert TrackingParams(uri="sqlite:///mine.db").resolved_uri() == "sqlite:///mine.db"
    # The logged params name the URI in use, never its password.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://team:s3cret@db:5432/mlflow")
    assert flatten(PipelineParams())["tracking.uri"] == "postgresql://team:***@db:5432/mlflow"


def _postgres_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(versions[-1]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_uri():
    """A throw-away PostgreSQL server: data and socket in a temporary folder, a free port."""
    pytest.importorskip("psycopg2", reason="no PostgreSQL driver (pip install psycopg2-binary)")
    bin_dir = _postgres_bin()
    if bin_dir is None or not (bin_dir / "initdb").exists():
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found; "
                    "Debian: apt-get install postgresql")
    prefix: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="defectflow-pg-"))  # not under pytest's 0700 root
    if os.geteuid() == 0:  # postgres refuses to run as root: run it as the postgres user
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(folder)
            pytest.skip("running as root and no 'postgres' system user to run PostgreSQL as")
        if shutil.which("runuser") is None:
            shutil.rmtree(folder)
            pytest.skip("running as root and no runuser to start PostgreSQL as 'postgres'")
        os.chown(folder, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", _free_port()

    def pg(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120)

    init = pg(str(bin_dir / "initdb"), "-D", str(data), "-U", "defectflow", "-A", "trust",
              "--no-sync")
    if init.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"initdb failed here: {init.stderr.strip()[-300:]}")
    options = (f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off "
               "-c full_page_writes=off")
    started = pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options,
                 "-l", str(folder / "server.log"), "-w", "-t", "60", "start")
    if started.returncode != 0:
        log = (folder / "server.log").read_text() if (folder / "server.log").exists() else ""
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"PostgreSQL did not start here: {(started.stderr + log).strip()[-300:]}")
    try:
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=port, user="defectflow",
                                      dbname="postgres")
        connection.autocommit = True
        connection.cursor().execute("CREATE DATABASE mlflow")
        connection.close()
        # Trust authentication ignores the password; it is there to prove it is never logged.
        # "+psycopg2": SQLAlchemy 2.1's default PostgreSQL driver is psycopg 3.
        yield f"postgresql+psycopg2://defectflow:s3cret@127.0.0.1:{port}/mlflow"
    finally:
        pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def test_pipeline_tracks_to_postgresql_from_the_environment(postgres_uri, tmp_path,
                                                            monkeypatch):
    data = make_folder_dataset(tmp_path / "product", n_good=20, n_bad=6)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({  # no tracking.uri: MLFLOW_TRACKING_URI decides
        "dataset": {"layout": "folder", "path": str(data), "name": "generated-pg"},
        "features": {"input_size": 64},
        "methods": {"patchcore": {"coreset_ratio": 0.5}},
        "evaluation": {"overlays": 1, "plots": False},
        "cache_dir": str(tmp_path / "cache")}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", postgres_uri)
    monkeypatch.chdir(tmp_path)  # a database URI keeps artifacts in ./mlartifacts
    assert main(["run", str(params), "--quiet"]) == 0

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=postgres_uri)
    experiment = client.get_experiment_by_name("generated-pg")
    runs = client.search_runs([experiment.experiment_id])
    child = next(r for r in runs if r.data.tags.get("mlflow.parentRunId"))
    assert child.data.tags["method"] == "patchcore"
    assert child.data.metrics["image_auroc"] >= 0.9
    assert "s3cret" not in child.data.params["tracking.uri"]
    assert child.data.params["tracking.uri"].startswith("postgresql+psycopg2://defectflow:***@")
    assert {"roc.png", "metrics.json", "model"} <= {
        a.path for a in client.list_artifacts(child.info.run_id)}

    # The values are in PostgreSQL itself, not in a file store beside it.
    import psycopg2

    port = int(postgres_uri.rsplit(":", 1)[1].split("/")[0])
    with psycopg2.connect(host="127.0.0.1", port=port, user="defectflow",
                          dbname="mlflow") as connection:
        cursor = connection.cursor()
        cursor.execute("SELECT value FROM metrics WHERE run_uuid = %s AND key = 'image_auroc'",
                       (child.info.run_id,))
        assert cursor.fetchone()[0] == pytest.approx(child.data.metrics["image_auroc"])
    assert not (tmp_path / "mlflow.db").exists()
