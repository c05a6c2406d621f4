"""Every params file the project ships passes the checks `defectflow run` makes before any
work (backbones, layers, feature sources, device, data source, cache, tracking store), so a
user's first command with one of them does not stop on a setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from defectflow.flows.preflight import preflight
from defectflow.tasks.params import load_params

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "params").glob("*.yaml"))


def test_the_project_ships_params_files():
    assert len(SHIPPED) >= 5 and ROOT / "params" / "magnetic-tile-best.yaml" in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_a_shipped_params_file_passes_the_checks_before_a_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)   # data paths in the files are relative to the checkout
    scratch = {"cache_dir": str(tmp_path / "cache"),
               "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    params = load_params(path, scratch)
    data = params.dataset.path
    if data and data.startswith("../shared") and not (ROOT / data).exists():
        pytest.skip(f"{data} is not beside this checkout")
    if data and not (ROOT / data).exists():
        # The template (example.yaml) names the user's own folder: a generated one stands in.
        assert params.dataset.layout == "folder", f"{path.name}: {data} does not exist"
        from conftest import make_folder_dataset

        folder = make_folder_dataset(tmp_path / "product", n_good=4, n_bad=2, size=32)
        params = load_params(path, {**scratch, "dataset.path": str(folder)})
    preflight(params)
    assert params.methods, f"{path.name} names no detector"
