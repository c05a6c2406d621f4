"""bench/accuracy.py on a tiny generated data set: every detector row, seeds, the JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from conftest import make_folder_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def accuracy_bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    sys.modules.pop("accuracy", None)
    import accuracy

    return accuracy


def test_accuracy_bench_measures_each_seed_and_setting(tmp_path, accuracy_bench, capsys):
    data = make_folder_dataset(tmp_path / "product", n_good=24, n_bad=8, size=64)
    params = tmp_path / "tiny.yaml"
    params.write_text(yaml.safe_dump({
        "dataset": {"layout": "folder", "path": str(data), "category": "product"},
        "features": {"input_size": 64, "layers": ["blocks.2", "blocks.3"]},
        "methods": {"patchcore": {"coreset_ratio": 0.2}},
        "cache_dir": str(tmp_path / "cache"),
    }))
    out = tmp_path / "accuracy.json"
    result = accuracy_bench.main([
        "--datasets", str(params), "--detectors", "patchcore", "padim", "--seeds", "2",
        "--setting", "params", "--setting", "b34: features.layers=[blocks.3,blocks.4]",
        "--json", str(out)])

    rows = result["rows"]
    assert len(rows) == 2 * 2 * 2  # settings x seeds x detectors
    assert {r["seed"] for r in rows} == {0, 1}
    assert {(r["setting"], r["detector"]) for r in rows} == {
        (s, d) for s in ("params", "b34") for d in ("patchcore", "padim")}
    for row in rows:
        assert row["dataset"] == "tiny"
        # The generated defects are obvious: every detector ranks them first, and they have masks.
        assert row["image_auroc"] > 0.8
        assert 0.5 < row["pixel_auroc"] <= 1.0 and 0 < row["aupro"] <= 1.0
        assert row["fit_s"] > 0 and row["score_s"] > 0

    summary = {(e["setting"], e["detector"]): e for e in result["summary"]}
    entry = summary[("b34", "padim")]
    values = [r["image_auroc"] for r in rows if (r["setting"], r["detector"]) == ("b34", "padim")]
    assert entry["image_auroc"][0] == pytest.approx(sum(values) / 2)
    assert entry["seeds"] == [0, 1]
    assert json.loads(out.read_text())["summary"] == result["summary"]
    table = capsys.readouterr().out
    assert "| tiny" in table and "pixel AUROC" in table and "± " in table


def test_a_setting_that_names_a_bad_value_is_a_one_line_error(accuracy_bench):
    from defectflow.tasks.errors import DefectflowError

    with pytest.raises(DefectflowError, match="--set"):
        accuracy_bench.Setting.parse("bad: features.layers=[unclosed")
