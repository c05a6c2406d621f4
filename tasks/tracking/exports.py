"""Exported models in the registry: a registered version exported to ONNX / OpenVINO
(``serving.onnx_export``), the files logged on the version's run under ``export/<format>/``
and fetched back for scoring."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from ..errors import DefectflowError
from ..serving.config import CONFIG_NAME
from ..serving.onnx_export import EXPORT_JSON, FORMATS, GRAPH_VERSION, export_folder
from .loading import resolve_model


def export_artifact_path(fmt: str) -> str:
    return f"export/{fmt}"


def download_model_folder(resolved: dict, uri: str, dest: Path) -> Path:
    """The registered version's model folder (``detector/`` + ``scoring.json``, or a
    fusion's), downloaded into ``dest``."""
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=resolved["uri"],
                                                     dst_path=str(dest)))
    found = sorted(p.parent for p in local.rglob(CONFIG_NAME)) + \
        sorted(p.parent for p in local.rglob("fusion") if p.is_dir())
    if not found:
        raise DefectflowError(f"registered model {resolved['name']} version "
                              f"{resolved['version']} holds no model folder", resolved["uri"])
    # A fusion's folder holds its detectors' folders: the outermost folder is the model.
    return min(found, key=lambda p: len(p.parts))


def export_registered(resolved: dict, uri: str, fmt: str, out: str | Path,
                      work: str | Path) -> Path:
    """Export the registered version ``resolved`` (``loading.resolve_model``) as ``fmt`` into
    ``out`` and log the files on its run under ``export/<fmt>/``; tags the version
    ``export.<fmt>`` with their artifact URI. ``work``: a scratch folder."""
    if fmt not in FORMATS:
        raise DefectflowError(f"unknown export format {fmt!r}: choose from {list(FORMATS)}")
    folder = download_model_folder(resolved, uri, Path(work))
    out = export_folder(folder, fmt, out)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.log_artifacts(resolved["run_id"], str(out), export_artifact_path(fmt))
    run = client.get_run(resolved["run_id"])
    client.set_model_version_tag(resolved["name"], resolved["version"], f"export.{fmt}",
                                 f"{run.info.artifact_uri}/{export_artifact_path(fmt)}")
    return out


def fetch_exported(resolved: dict, uri: str, fmt: str, dest: str | Path) -> Path | None:
    """The version's exported ``fmt`` files, downloaded into ``dest``; None when the version
    was never exported to ``fmt``, or when the logged export was made by an older graph
    (``GRAPH_VERSION``), which the caller then exports anew."""
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    names = {Path(a.path).name for a in client.list_artifacts(resolved["run_id"],
                                                              export_artifact_path(fmt))}
    if EXPORT_JSON not in names:
        return None
    local = Path(client.download_artifacts(resolved["run_id"], export_artifact_path(fmt),
                                           str(dest)))
    if json.loads((local / EXPORT_JSON).read_text()).get("graph_version", 1) != GRAPH_VERSION:
        return None
    return local


def exported_model(ref: str | dict, uri: str, fmt: str, dest: str | Path) -> tuple[Path, dict]:
    """(local folder of the exported files, resolved version) of ``NAME@ALIAS`` /
    ``NAME/VERSION``: the files logged by an earlier export, or exported (and logged) now."""
    resolved = resolve_model(ref, uri) if isinstance(ref, str) else ref
    dest = Path(dest)
    found = fetch_exported(resolved, uri, fmt, dest / "fetched")
    if found is None:
        found = export_registered(resolved, uri, fmt, dest / "exported", dest / "work")
    return found, resolved
