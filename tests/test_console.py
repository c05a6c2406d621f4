"""The console of a cold ``defectflow run`` written to a file: step lines only (no
progress-bar fragments, no MLflow INFO lines), each step's own time apart from its wait,
the printed total equal to the logged one, and how to open the MLflow UI; a whole-image
run on elongated images warns once."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

import pandas as pd

from conftest import make_folder_dataset
from test_flow import write_params


def test_cold_run_to_a_file_prints_clean_lines(tmp_path):
    data = make_folder_dataset(tmp_path / "product", n_good=30, n_bad=8)
    params = write_params(tmp_path, data)
    out_file, err_file = tmp_path / "out.txt", tmp_path / "err.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")  # cold: no cached results anywhere
    with open(out_file, "w") as out, open(err_file, "w") as err:
        code = subprocess.run([sys.executable, "-m", "defectflow.cli", "run", str(params)],
                              stdout=out, stderr=err, env=env, cwd=tmp_path,
                              timeout=900).returncode
    stdout, stderr = out_file.read_text(), err_file.read_text()
    assert code == 0, stderr
    both = stdout + stderr
    assert "\r" not in both and "\x1b[" not in both  # no bar redraws, no status line
    assert not re.search(r"\d+%\|", both) and "it/s" not in both and "patch/s" not in both
    assert " INFO " not in both and "Creating initial MLflow database tables" not in both

    steps = [line for line in stdout.splitlines()
             if re.match(r"  \S.* (ran|cached) +[\d.]+ s", line)]
    assert len(steps) >= 8 and all(" ran " in line for line in steps)  # cold: all ran
    lines = stdout.splitlines()
    hint = next(i for i, line in enumerate(lines) if line.startswith("MLflow UI: mlflow ui"))
    table = next(i for i, line in enumerate(lines) if line.startswith("category"))
    assert hint > table and "viewStateShareKey=defectflow" in lines[hint]
    assert "recall@thr" in lines[table] and "F1-max (test-tuned)" in lines[table]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("generated")
    parent = next(r for r in client.search_runs([experiment.experiment_id])
                  if "mlflow.parentRunId" not in r.data.tags)
    printed = float(re.search(r"total time: ([\d.]+) s", stdout).group(1))
    assert printed == round(parent.data.metrics["total_seconds"], 1)
    # Each step's own time and its wait are logged apart; a step's own time fits the run.
    logged = pd.read_csv(client.download_artifacts(parent.info.run_id, "steps.csv",
                                                   str(tmp_path)))
    assert {"seconds", "wait_seconds", "started", "ended"} <= set(logged.columns)
    assert (logged["seconds"] <= parent.data.metrics["total_seconds"]).all()


def test_whole_image_run_on_elongated_images_warns_once():
    from defectflow.tasks.patches import squash_warning, warn_if_squashed

    manifest = pd.DataFrame({"image_id": ["fabric/good/a", "fabric/good/b", "fabric/bad/c"],
                             "width": [4096, 4096, 300], "height": [256, 256, 300]})
    message = squash_warning(manifest, None)
    assert "16.0:1" in message and "patches.size" in message and "2 images" in message
    assert squash_warning(manifest, 256) is None
    assert squash_warning(manifest.iloc[2:], None) is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_squashed(manifest, None)
    assert len(caught) == 1 and "patches.size" in str(caught[0].message)


def test_help_lists_every_command_in_plain_text():
    text = subprocess.run([sys.executable, "-m", "defectflow.cli", "--help"],
                          capture_output=True, text=True, check=True).stdout
    for command in ("defectflow run", "defectflow serve", "defectflow score"):
        assert command in text
    assert "``" not in text and "`" not in text
