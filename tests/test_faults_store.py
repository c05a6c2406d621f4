"""Faults of the environment and the tracking store, and bad input: each ends in one line
naming the file or setting (exit 2) before any compute, or is handled so that no run stays
RUNNING and nothing is written where it should not be.

Read-only folders and files are real: ``chmod`` for a normal user; for root (whom permission
bits do not stop) a read-only bind mount in a private mount namespace of the child process
(``unshare -m``), which disappears with it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import make_folder_dataset
from defectflow.cli import main

CLI = [sys.executable, "-m", "defectflow.cli"]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def _params(tmp: Path, data: Path, **extra) -> Path:
    params = {
        "dataset": {"layout": "folder", "path": str(data), "name": "generated"},
        "features": {"input_size": 64},
        "methods": {"patchcore": {"coreset_ratio": 0.5}},
        "evaluation": {"overlays": 0, "plots": False},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        "cache_dir": str(tmp / "cache"),
    }
    for key, value in extra.items():
        params[key] = {**params.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_folder_dataset(tmp_path_factory.mktemp("faults") / "product", n_good=20,
                               n_bad=6)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def _assert_one_line(code: int, err: str, *expected: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("defectflow: error:")
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def _nothing_computed(cache: Path) -> bool:
    """No step wrote into the cache (the preflight may have created the empty folder)."""
    return not cache.exists() or not any(p.is_file() for p in cache.rglob("*"))


# -- read-only folders and files ---------------------------------------------------------
def _readonly_command(command: list[str], paths: list[Path]) -> list[str]:
    """``command`` run with ``paths`` read-only (root: bind mounts of its own)."""
    if os.geteuid() != 0:
        return command
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root without mount namespaces: no read-only folder possible")
    mounts = " && ".join(f'mount --bind "{p}" "{p}" && mount -o remount,ro,bind "{p}" "{p}"'
                         for p in paths)
    return ["unshare", "-m", "--propagation", "private", "sh", "-c",
            f'{mounts} && exec "$@"', "sh", *command]


def _run_readonly(command: list[str], paths: list[Path]) -> subprocess.CompletedProcess:
    modes = {p: p.stat().st_mode for p in paths}
    if os.geteuid() != 0:
        for p in paths:
            p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        return subprocess.run(_readonly_command(command, paths), capture_output=True,
                              text=True, env=ENV, timeout=300)
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


def test_read_only_cache_folder_is_one_line_before_any_compute(data, tmp_path):
    params = _params(tmp_path, data)
    cache = tmp_path / "cache"
    cache.mkdir()
    result = _run_readonly([*CLI, "run", str(params), "--quiet"], [cache])
    _assert_one_line(result.returncode, result.stderr, f"cache_dir {cache}", "not writable")
    assert not (tmp_path / "mlflow.db").exists()  # stopped before tracking, too
    assert list(cache.iterdir()) == []


def test_read_only_sqlite_file_is_one_line_before_any_compute(data, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()  # an existing, initialised store
    params = _params(tmp_path, data)
    result = _run_readonly([*CLI, "run", str(params), "--quiet"], [tmp_path / "mlflow.db"])
    _assert_one_line(result.returncode, result.stderr, uri, "not writable")
    assert _nothing_computed(tmp_path / "cache")


def test_unreachable_database_port_is_one_line_in_seconds(data, tmp_path):
    pytest.importorskip("psycopg2", reason="no PostgreSQL driver (pip install psycopg2-binary)")
    uri = f"postgresql+psycopg2://mlflow:secret@127.0.0.1:{_closed_port()}/mlflow"
    params = _params(tmp_path, data, tracking={"uri": uri})
    # MLflow's own engine retries took ~100 s after the whole pipeline; the timeout here only
    # keeps a regression from hanging the suite.
    result = subprocess.run([*CLI, "run", str(params), "--quiet"], capture_output=True,
                            text=True, env=ENV, timeout=90)
    line = _assert_one_line(result.returncode, result.stderr, "127.0.0.1", "not reachable")
    assert "secret" not in line  # the password is not printed
    assert _nothing_computed(tmp_path / "cache")


# -- concurrent first use of a fresh store ------------------------------------------------
_FIRST_USE = """
import sys, time
from defectflow.tasks.tracking import Tracker
from defectflow.tasks.tracking.store import prepare_store
uri, start = sys.argv[1], float(sys.argv[2])
while time.time() < start:  # all three start together, after their imports
    time.sleep(0.01)
prepare_store(uri)
tracker = Tracker(uri, "generated")
run_id = tracker.start_run("first-use", {})
tracker.finish(run_id)
print("ok", run_id)
"""


def test_three_first_uses_of_a_fresh_sqlite_store_at_once_all_succeed(tmp_path):
    """Without the lock, three processes creating a fresh store at once failed in alembic
    (two of three in a try with MLflow 3.17.2: "duplicate column name: step")."""
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    start = time.time() + 20  # after the slowest import on a busy machine
    procs = [subprocess.Popen([sys.executable, "-c", _FIRST_USE, uri, str(start)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=ENV) for _ in range(3)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-2000:]
        assert out.startswith("ok")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("generated")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}


# -- names from data ----------------------------------------------------------------------
def test_dataset_name_with_dot_dot_keeps_artifacts_inside_mlartifacts(tmp_path):
    from defectflow.tasks.tracking import Tracker

    root = tmp_path / "store"
    root.mkdir()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = Tracker(uri, "../evil")
    run_id = tracker.start_run("r", {})
    note = tmp_path / "note.txt"
    note.write_text("hello")
    tracker.log_file(run_id, note)
    tracker.finish(run_id)
    written = [p for p in tmp_path.rglob("note.txt") if p != note]
    assert len(written) == 1
    assert (root / "mlartifacts") in written[0].parents
    assert not (tmp_path / "evil").exists()
    assert tracker.client.get_experiment(tracker.experiment_id).name == "../evil"


def test_a_failure_while_logging_ends_the_run_failed(tmp_path):
    from mlflow.tracking import MlflowClient

    from defectflow.tasks.tracking import log_scoring_batch

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    model = {"name": "m", "version": "1", "alias": "champion", "tags": {}}

    class Unwritable:  # a table whose writing fails half-way through the run
        def to_csv(self, *args, **kwargs):
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        log_scoring_batch(uri, "scoring", model, {"n_scored": 1},
                          {"results.csv": Unwritable()}, {})
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("scoring").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_quotes_in_dataset_and_category_names_with_the_registry_on(data, tmp_path, capsys):
    """The names went unescaped into a registry filter: the run failed after the pipeline
    and its parent run stayed RUNNING."""
    params = _params(tmp_path, data, dataset={"name": "o'brien", "category": "it's"},
                     registry={"enabled": True, "name_prefix": "df"})
    assert main(["run", str(params), "--quiet"]) == 0
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("o'brien").experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    name = "df-o'brien-it's-patchcore"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    # A rerun finds the registered version by its key (a filter with the quoted name).
    assert main(["run", str(params), "--quiet"]) == 0
    assert len(client.search_model_versions(f'name = "{name}"')) == 1


# -- the CLI battery ----------------------------------------------------------------------
def _battery_cases(tmp: Path) -> list[tuple[list[str], list[str]]]:
    """(extra CLI arguments after ``run PARAMS``, or a whole command line; texts the line
    must name)."""
    (tmp / "a_file").write_text("not a folder")
    (tmp / "not_a_db.db").write_text("not a database")
    port = _closed_port()
    bad_backbone = tmp / "bad_backbone.yaml"
    bad_backbone.write_text(yaml.safe_dump({**yaml.safe_load((tmp / "params.yaml").read_text()),
                                            "features": {"backbone": "vgg99"}}))
    missing = tmp / "missing" / "mistyped.db"
    return [
        (["--set", "features.input_size=abc"],
         ["--set features.input_size=abc: features.input_size:", "valid integer"]),
        (["--set", "features.device=gpu"], ["--set features.device=gpu", "device"]),
        (["--set", "features.device=cuda:99"], ["--set features.device=cuda:99", "cuda:99"]),
        (["--set", "features.backbone=vgg99"], ["--set features.backbone=vgg99", "vgg99"]),
        (["--set", "features.layers=[blocks.2, layer9]"], ["--set features.layers=", "layer9"]),
        (["run", str(bad_backbone)], [str(bad_backbone), "features.backbone", "vgg99"]),
        (["--set", "features.input_size.x=1"], ["features.input_size is not a mapping"]),
        # The heterogeneous feature ensemble's settings (features.sources).
        (["--set", "features.sources=[{backbone: efficientnet_lite9, layers: [blocks.2]}]"],
         ["--set features.sources=", "features.sources[0].backbone", "efficientnet_lite9"]),
        (["--set", "features.sources=[{backbone: efficientnet_lite0, layers: [blocks.2]}]",
          "--set", "features.channels=41"],
         ["features.channels: 41 is more than the 40 channels"]),
        (["--set", "features.combine=average"],
         ["--set features.combine=average", "combine must be one of"]),
        (["--set", "a=["], ["--set a=[", "not valid YAML"]),
        (["--set", "novalue"], ["--set expects KEY=VALUE"]),
        (["--set", "dataset.category=../x"], ["--set dataset.category=../x", "category"]),
        (["--set", "dataset.path=/nonexistent/product"], ["/nonexistent/product"]),
        (["--set", f"cache_dir={tmp / 'a_file'}"], [f"cache_dir {tmp / 'a_file'}", "a file"]),
        (["--set", "min_free_gb=1000000"], ["cache_dir", "GiB free", "min_free_gb"]),
        (["--set", f"tracking.uri=sqlite:///{tmp / 'not_a_db.db'}"], ["not a usable SQLite"]),
        (["--set", f"tracking.uri=sqlite:///{tmp}"], ["not a file"]),
        (["--set", f"tracking.uri=http://127.0.0.1:{port}"], ["not reachable"]),
        (["score", "--model", "m@champion", "--inbox", str(tmp), "--out", str(tmp / "out"),
          "--tracking-uri", f"sqlite:///{missing}"], ["no such SQLite file", str(missing)]),
        (["score", "--model", "m@champion", "--inbox", str(tmp), "--out", str(tmp / "a_file"),
          "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}"], ["--out", "a file"]),
        (["serve", str(tmp / "params.yaml"), "--interval", "5", "--set", "features.device=tpu"],
         ["--set features.device=tpu"]),
    ]


BATTERY_SIZE = 22


@pytest.fixture(scope="module")
def battery(data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("battery")
    params = _params(tmp, data)
    return tmp, params, _battery_cases(tmp)


@pytest.mark.parametrize("case", range(BATTERY_SIZE))
def test_cli_battery_of_bad_inputs_is_one_line_exit_2(battery, case, capsys, monkeypatch):
    tmp, params, cases = battery
    assert len(cases) == BATTERY_SIZE
    args, expected = cases[case]
    # serve's precondition; no Prefect server is started, as every case fails before.
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    argv = args if args[0] in ("run", "score", "serve") else ["run", str(params), *args]
    code = main(argv)
    _assert_one_line(code, capsys.readouterr().err, *expected)
    # Nothing was computed and no store was created by a failed check.
    assert _nothing_computed(tmp / "cache")
    assert not (tmp / "missing").exists()
