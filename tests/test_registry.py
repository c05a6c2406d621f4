"""Registry and inbox pieces without a pipeline run: champion promotion, model references,
registry params, the scoring settings file, and the inbox's move-last bookkeeping."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from conftest import add_defect, textured_image
from defectflow.tasks.errors import DefectflowError
from defectflow.tasks.serving import inbox as inbox_lib


class DarkPixelScorer:
    """A stand-in for the pyfunc: score = share of dark pixels (the generated defects)."""

    threshold = 0.01

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, paths: list[str]) -> pd.DataFrame:
        from defectflow.tasks.images import read_image

        self.calls.append(list(paths))
        maps = [(read_image(p)[:, :, 0] < 50).astype(np.float32) for p in paths]
        scores = [float(m.mean()) for m in maps]
        return pd.DataFrame({"image": paths, "score": scores, "threshold": self.threshold,
                             "verdict": ["defective" if s > self.threshold else "good"
                                         for s in scores], "anomaly_map": maps})


def _fill(inbox: Path) -> None:
    inbox.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    cv2.imwrite(str(inbox / "a.png"), textured_image(rng))
    cv2.imwrite(str(inbox / "b.png"), add_defect(textured_image(rng), rng)[0])
    (inbox / "c.jpg").write_bytes(b"")                      # empty: unreadable
    (inbox / "d.png.part").write_bytes(b"still copying")    # not an image suffix: left alone


def test_inbox_scores_quarantines_and_moves_last(tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    _fill(inbox)
    scorer = DarkPixelScorer()
    batch = inbox_lib.score_inbox(inbox, out, scorer, "m", "3", map_vmax=1.0)
    assert batch.counts == {"n_scored": 2, "n_quarantined": 1, "n_defective": 1,
                            "n_recovered": 0, "n_duplicates": 0}
    results = inbox_lib.read_results(out)
    assert list(results["image"]) == ["a.png", "b.png"]
    assert list(results["verdict"]) == ["good", "defective"]
    assert set(results["model_version"]) == {3}
    assert np.load(out / "maps" / "b.npy").shape == (64, 64)
    assert (out / "overlays" / "b.png").is_file()
    assert sorted(p.name for p in (inbox / "done").iterdir()) == ["a.png", "b.png"]
    assert (inbox / "quarantine" / "c.jpg").is_file()
    assert "cannot decode" in (inbox / "quarantine" / "c.jpg.reason.txt").read_text()
    assert sorted(p.name for p in inbox.iterdir() if p.is_file()) == ["d.png.part"]
    assert not list(out.rglob("*.partial*"))

    # Nothing new: the scorer is not called and nothing changes.
    again = inbox_lib.score_inbox(inbox, out, scorer, "m", "3")
    assert again.counts["n_scored"] == 0 and len(scorer.calls) == 1
    assert len(inbox_lib.read_results(out)) == 2


def test_a_crash_between_row_and_move_is_not_scored_twice(tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    _fill(inbox)
    inbox_lib.score_inbox(inbox, out, DarkPixelScorer(), "m", "1")
    # Simulate a crash after b.png's row was written but before it left the inbox.
    os.rename(inbox / "done" / "b.png", inbox / "b.png")
    scorer = DarkPixelScorer()
    batch = inbox_lib.score_inbox(inbox, out, scorer, "m", "1")
    assert batch.recovered == ["b.png"] and not batch.rows and scorer.calls == []
    assert len(inbox_lib.read_results(out)) == 2
    assert (inbox / "done" / "b.png").is_file()


def test_names_already_used_get_a_suffix_and_nothing_is_overwritten(tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    _fill(inbox)
    inbox_lib.score_inbox(inbox, out, DarkPixelScorer(), "m", "1")
    first_map = np.load(out / "maps" / "a.npy")
    cv2.imwrite(str(inbox / "a.png"), add_defect(textured_image(np.random.default_rng(5)),
                                                 np.random.default_rng(6))[0])
    batch = inbox_lib.score_inbox(inbox, out, DarkPixelScorer(), "m", "1")
    assert [r["image"] for r in batch.rows] == ["a.png"]
    assert batch.rows[0]["map"] == "maps/a-1.npy" and batch.rows[0]["verdict"] == "defective"
    assert (inbox / "done" / "a-1.png").is_file()
    np.testing.assert_array_equal(np.load(out / "maps" / "a.npy"), first_map)


def test_a_running_batch_holds_the_inbox(tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    _fill(inbox)
    out.mkdir()
    with inbox_lib._Lock(out) as locked:
        assert locked
        batch = inbox_lib.score_inbox(inbox, out, DarkPixelScorer(), "m", "1")
    assert batch.busy and batch.counts["n_scored"] == 0
    assert (inbox / "a.png").is_file()


def test_missing_inbox_is_an_error_naming_it(tmp_path):
    with pytest.raises(DefectflowError, match="inbox folder not found"):
        inbox_lib.pending_images(tmp_path / "nowhere")


def test_scoring_settings_round_trip_and_reject_other_versions(tmp_path):
    from defectflow.tasks.feature_settings import FeatureSettings
    from defectflow.tasks.serving import ScoringConfig

    config = ScoringConfig(method="patchcore", dataset="d", category="c",
                           features=FeatureSettings(layers=("blocks.2", "blocks.4"),
                                                    input_size=64),
                           mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2),
                           threshold=1.5, denoise={"h": 10.0, "template_window": 7,
                                                   "search_window": 21}, patch_size=32)
    path = config.save(tmp_path / "scoring.json")
    assert ScoringConfig.load(path) == config
    saved = json.loads(path.read_text())
    # Models registered before version 2 kept the feature settings as flat fields (those
    # before version 3 had no sources, combine or channels).
    v1_fields = ("backbone", "layers", "input_size", "batch_size", "device")
    flat = {**{k: v for k, v in saved.items() if k != "features"},
            **{k: saved["features"][k] for k in v1_fields}, "version": 1}
    path.write_text(json.dumps(flat))
    assert ScoringConfig.load(path) == config
    path.write_text(json.dumps({**saved, "version": 99}))
    with pytest.raises(DefectflowError, match="version 99"):
        ScoringConfig.load(path)


def test_model_references(tmp_path):
    from defectflow.tasks.tracking import parse_model_ref

    assert parse_model_ref("a-b@champion") == ("a-b", "champion", None)
    assert parse_model_ref("a-b/4") == ("a-b", None, "4")
    for bad in ("a-b", "@x", "a-b/latest"):
        with pytest.raises(DefectflowError, match="NAME@ALIAS"):
            parse_model_ref(bad)


def test_registry_params_are_off_by_default_and_validated():
    from defectflow.tasks.params import load_params

    assert load_params(None).registry.enabled is False
    with pytest.raises(DefectflowError, match="registry.alias"):
        load_params(None, {"registry.alias": "latest"})
    with pytest.raises(DefectflowError, match="registry.name_prefix"):
        load_params(None, {"registry.name_prefix": "a b"})


def test_champion_is_the_best_version_by_the_chosen_metric(tmp_path):
    from mlflow.tracking import MlflowClient

    from defectflow.tasks.tracking import Tracker, promote_best

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "e")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("m")
    for auroc, fpr in ((0.8, 0.1), (0.95, 0.3), (None, 0.0), (0.9, 0.2)):
        run = client.create_run(tracker.experiment_id).info.run_id
        metrics = {"fpr_at_95_tpr": fpr, **({"image_auroc": auroc} if auroc else {})}
        tracker.log_metrics(run, metrics)
        client.create_model_version("m", f"runs:/{run}/model", run_id=run)
    assert promote_best(client, "m", "champion", "image_auroc") == "2"
    assert str(client.get_model_version_by_alias("m", "champion").version) == "2"
    # Lower is better for an error rate; version 3 has no AUROC but the lowest FPR.
    assert promote_best(client, "m", "champion", "fpr_at_95_tpr", greater_is_better=False) == "3"
    assert promote_best(client, "m", "champion", "no_such_metric") is None


def test_a_model_already_registered_is_found_by_its_key(tmp_path):
    from mlflow.tracking import MlflowClient

    from defectflow.tasks.tracking.registry import _version_with_tag

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert _version_with_tag(client, "m", "model_key", "abc") is None  # no such model yet
    client.create_registered_model("m")
    for key in ("abc", "def", "abc"):
        client.create_model_version("m", "file:///tmp/x", tags={"model_key": key})
    assert _version_with_tag(client, "m", "model_key", "abc") == "3"
    assert _version_with_tag(client, "m", "model_key", "xyz") is None


def test_score_command_input_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from defectflow.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    (tmp_path / "inbox").mkdir()
    base = ["score", "--model", "m@champion", "--out", str(tmp_path / "out")]
    cases = [(["--inbox", str(tmp_path / "missing")], "inbox folder not found"),
             (["--inbox", str(tmp_path / "inbox"), "--every", "0"], "--every must be a positive"),
             (["--inbox", str(tmp_path / "inbox"), "--every", "300"],
              "--every needs a Prefect server")]
    for extra, expected in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0]
    assert not (tmp_path / "out").exists()  # nothing was created for bad input
