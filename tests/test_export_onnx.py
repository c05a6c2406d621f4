"""ONNX / OpenVINO export of registered detectors: the exported model scores as the registered
pyfunc does (the parity guarantee), the files are logged on the version's run, an inbox is
scored through them with the usual guarantees, and what cannot be exported says why.

Parity, as guaranteed (and documented in the README):
- image scores: |s_exported - s_pyfunc| <= 1e-3 * |threshold|;
- verdicts identical;
- anomaly maps equal to float16 rounding: every pixel within 2^-10 (one float16 step) of
  the map's peak.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

for _module in ("onnx", "onnxruntime", "openvino"):
    pytest.importorskip(_module, reason="the optional 'export' extra is not installed "
                                        "(pip install -e '.[export]')")

from conftest import make_folder_dataset  # noqa: E402
from defectflow.cli import main  # noqa: E402
from defectflow.tasks.errors import DefectflowError  # noqa: E402
from defectflow.tasks.methods import METHODS, MSFlow, PaDiM, PatchCore  # noqa: E402
from defectflow.tasks.serving.exported import ExportedScorer  # noqa: E402
from defectflow.tasks.serving.onnx_export import export_folder  # noqa: E402
from test_flow import write_params  # noqa: E402
from test_score_inbox import _inbox  # noqa: E402

PREFIX = "dfx"
EXPORTED = [PatchCore.name, PaDiM.name, MSFlow.name]


def model_name(method: str) -> str:
    return f"{PREFIX}-generated-product-{method}"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """PatchCore, PaDiM and MSFlow trained on generated images, registered with alias
    champion."""
    tmp = tmp_path_factory.mktemp("export")
    data = make_folder_dataset(tmp / "product", n_good=30, n_bad=8)
    params = write_params(tmp, data, registry={"enabled": True, "name_prefix": PREFIX},
                          methods={PatchCore.name: {"coreset_ratio": 0.5},
                                   PaDiM.name: {"n_channels": 40},
                                   MSFlow.name: {"blocks": 2, "epochs": 8, "batch_size": 4,
                                                 "positional": 4}},
                          fusion={"enabled": False})
    assert main(["run", str(params), "--quiet"]) == 0
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    # Training and held-out goods, and every defective image.
    paths = sorted(str(p) for p in (data / "good").glob("*.png"))[-10:] + \
        sorted(str(p) for p in (data / "blob").glob("*.png"))
    return tmp, uri, paths


def assert_parity(exported: pd.DataFrame, reference: pd.DataFrame) -> None:
    threshold = float(reference["threshold"].iloc[0])
    theirs = reference["score"].to_numpy()
    gap = np.abs(exported["score"].to_numpy() - theirs)
    # Within 1e-3 of the threshold; a score far above it (a flow's NLL of an obvious defect
    # reaches thousands) within float32's relative rounding of its own size.
    assert (gap <= np.maximum(1e-3 * abs(threshold), 1e-5 * np.abs(theirs))).all(), (
        gap.max(), threshold, theirs[gap.argmax()])
    assert list(exported["verdict"]) == list(reference["verdict"])
    assert float(exported["threshold"].iloc[0]) == threshold
    for ours, theirs in zip(exported["anomaly_map"], reference["anomaly_map"]):
        assert ours.shape == theirs.shape and ours.dtype == np.float32
        peak = float(np.abs(theirs).max())
        assert np.abs(ours - theirs).max() <= 2 ** -10 * peak, np.abs(ours - theirs).max()


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
@pytest.mark.parametrize("method", EXPORTED)
def test_exported_model_scores_as_the_pyfunc(registered, tmp_path, capsys, method, fmt):
    tmp, uri, paths = registered
    if fmt in METHODS[method].format_refusals:       # refused in one line, exit code 2
        assert main(["export", "--model", f"{model_name(method)}@champion", "--format", fmt,
                     "--out", str(tmp_path / fmt), "--tracking-uri", uri]) == 2
        assert f"cannot be exported to {fmt}: " in capsys.readouterr().err
        return
    from mlflow.tracking import MlflowClient

    from defectflow.tasks.tracking import load_model

    out = tmp_path / fmt
    assert main(["export", "--model", f"{model_name(method)}@champion", "--format", fmt,
                 "--out", str(out), "--tracking-uri", uri]) == 0
    meta = json.loads((out / "export.json").read_text())
    assert meta["method"] == method and meta["input_size"] == 64
    assert meta["inputs"][0]["dtype"] == "uint8" and (out / meta["model_file"]).is_file()

    pyfunc, resolved = load_model(f"{model_name(method)}@champion", uri)
    reference = pyfunc.predict(pd.DataFrame({"path": paths}))
    assert meta["threshold"] == pytest.approx(float(reference["threshold"].iloc[0]))
    exported = ExportedScorer(out, threads=2).score(paths)
    assert list(exported["image"]) == paths
    assert_parity(exported, reference)
    # Both kinds of verdict occur, so the agreement is not trivial.
    assert set(reference["verdict"]) == {"good", "defective"}

    # The files are artifacts of the version's run, and the version points at them.
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    logged = {Path(a.path).name for a in client.list_artifacts(resolved["run_id"],
                                                               f"export/{fmt}")}
    assert {"export.json", "scoring.json", meta["model_file"]} <= logged
    version = client.get_model_version(resolved["name"], resolved["version"])
    assert version.tags[f"export.{fmt}"].endswith(f"export/{fmt}")


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_an_approximate_search_is_exported_with_its_cells_and_scores_as_the_pyfunc(
        registered, tmp_path, fmt):
    """search: ivf: the graph ends at the patch features; the exported folder carries the
    bank and the cells saved with the model, searched as the pyfunc searches them."""
    import dataclasses

    from defectflow.tasks.methods.cell_search import CELLS_FILE
    from defectflow.tasks.serving.scorer import ImageScorer
    from defectflow.tasks.tracking import resolve_model
    from defectflow.tasks.tracking.exports import download_model_folder

    tmp, uri, paths = registered
    folder = download_model_folder(resolve_model(f"{model_name(PatchCore.name)}@champion", uri),
                                   uri, tmp_path / "model")
    detector = PatchCore.load(folder / "detector")
    detector.params = dataclasses.replace(detector.params, search="ivf", ivf_lists=16,
                                          ivf_probe=2)
    detector.save(folder / "detector")
    assert (folder / "detector" / CELLS_FILE).is_file()
    reference = ImageScorer.from_folder(folder).score(paths)
    out = export_folder(folder, fmt, tmp_path / fmt)
    meta = json.loads((out / "export.json").read_text())
    assert meta["search"] == "ivf" and meta["outputs"][0]["name"] == "features"
    assert (out / "detector" / CELLS_FILE).is_file()
    assert_parity(ExportedScorer(out, threads=2).score(paths), reference)
    assert set(reference["verdict"]) == {"good", "defective"}


def test_score_command_through_the_export_keeps_the_inbox_guarantees(registered, tmp_path):
    tmp, uri, _ = registered
    from defectflow.tasks.tracking import load_model

    labels = _inbox(tmp_path / "inbox")
    out = tmp_path / "scored"
    # No export of this format was logged before: the command exports and logs it first.
    assert main(["score", "--model", f"{model_name(PaDiM.name)}@champion", "--format", "onnx",
                 "--inbox", str(tmp_path / "inbox"), "--out", str(out),
                 "--tracking-uri", uri]) == 0
    results = pd.read_csv(out / "results.csv")
    assert sorted(results["image"]) == sorted(labels)
    assert (tmp_path / "inbox" / "quarantine" / "broken.png").is_file()
    assert (tmp_path / "inbox" / "notes.txt").is_file()
    done = tmp_path / "inbox" / "done"
    assert sorted(p.name for p in done.iterdir()) == sorted(labels)
    for row in results.itertuples():
        assert (out / row.map).is_file() and (out / row.overlay).is_file()
    pyfunc, _ = load_model(f"{model_name(PaDiM.name)}@champion", uri)
    reference = pyfunc.predict([str(done / name) for name in results["image"]])
    threshold = float(reference["threshold"].iloc[0])
    assert np.abs(results["score"].to_numpy() - reference["score"].to_numpy()).max() <= \
        1e-3 * abs(threshold)
    assert list(results["verdict"]) == list(reference["verdict"])
    # A second call finds nothing new.
    assert main(["score", "--model", f"{model_name(PaDiM.name)}@champion", "--format", "onnx",
                 "--inbox", str(tmp_path / "inbox"), "--out", str(out),
                 "--tracking-uri", uri]) == 0
    assert len(pd.read_csv(out / "results.csv")) == len(results)


@pytest.mark.parametrize("method", sorted(set(METHODS) - set(EXPORTED)))
def test_detectors_without_an_export_say_why(method):
    with pytest.raises(DefectflowError, match=f"a {method} detector cannot be exported: .+"):
        METHODS[method]().torch_head(64)


def test_patch_models_and_fusions_are_refused_in_one_line(registered, tmp_path, capsys):
    tmp, uri, _ = registered
    from defectflow.tasks.tracking import resolve_model
    from defectflow.tasks.tracking.exports import download_model_folder

    folder = download_model_folder(resolve_model(f"{model_name(PatchCore.name)}@champion", uri),
                                   uri, tmp_path / "model")
    config = json.loads((folder / "scoring.json").read_text())
    (folder / "scoring.json").write_text(json.dumps({**config, "patch_size": 32,
                                                     "patch_stride": 32}))
    with pytest.raises(DefectflowError, match="32 px patches cannot be exported"):
        export_folder(folder, "onnx", tmp_path / "out")
    (folder / "fusion").mkdir()
    with pytest.raises(DefectflowError, match="SegAD fusion cannot be exported"):
        export_folder(folder, "onnx", tmp_path / "out")
    assert main(["export", "--model", "no-such-model@champion", "--format", "onnx",
                 "--out", str(tmp_path / "x"), "--tracking-uri", uri]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_an_export_logged_by_an_older_graph_is_made_anew(registered, tmp_path):
    """An export whose export.json names an older graph_version is not reused: it is
    exported anew and logged over the old files."""
    from mlflow.tracking import MlflowClient

    from defectflow.tasks.serving.onnx_export import EXPORT_JSON, GRAPH_VERSION
    from defectflow.tasks.tracking.exports import exported_model

    tmp, uri, _ = registered
    ref = f"{model_name(PaDiM.name)}@champion"
    folder, resolved = exported_model(ref, uri, "onnx", tmp_path / "first")
    meta = json.loads((folder / EXPORT_JSON).read_text())
    assert meta["graph_version"] == GRAPH_VERSION
    old = tmp_path / "old"
    old.mkdir()
    (old / EXPORT_JSON).write_text(json.dumps({**meta, "graph_version": GRAPH_VERSION - 1}))
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.log_artifact(resolved["run_id"], str(old / EXPORT_JSON), "export/onnx")

    folder, _ = exported_model(ref, uri, "onnx", tmp_path / "second")
    assert json.loads((folder / EXPORT_JSON).read_text())["graph_version"] == GRAPH_VERSION
    logged = client.download_artifacts(resolved["run_id"], f"export/onnx/{EXPORT_JSON}",
                                       str(tmp_path / "check"))
    assert json.loads(Path(logged).read_text())["graph_version"] == GRAPH_VERSION
