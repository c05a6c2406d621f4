"""The one place that talks to MLflow.

Run layout: one experiment per dataset; one parent run per pipeline
invocation; one child run per (category, method) with tags ``dataset``,
``category``, ``method``, ``backbone``; params flattened from the resolved
YAML; artifacts under stable names (``manifest.parquet``, ``counts.csv``,
``roc.png``, ``overlays/``, ``model/``).

- ``client``: ``Tracker``, the MLflow client of one experiment;
- ``runs``: ``record_pipeline``, the parent, detector and fusion runs of a pipeline run;
- ``registry``: registered models, their versions and aliases;
- ``pyfunc``: the MLflow pyfunc wrappers of the served detectors and fusions;
- ``loading``: model references, loading a registered model, scoring-batch runs;
- ``exports``: ONNX / OpenVINO exports of a registered version, logged on its run (loads
  torch: import ``tracking.exports`` itself).
- ``views``: what the MLflow UI shows without clicks (experiment kind, the runs table's
  comparison view, the parent run's description).
"""

import os

# MLflow reads these when it is imported: set before any submodule imports it.
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in CLI output
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # no INFO lines in the step log

from .client import Tracker  # noqa: E402
from .loading import load_model, log_scoring_batch, parse_model_ref, resolve_model  # noqa: E402
from .pyfunc import DetectorPyfunc, FusionPyfunc  # noqa: E402
from .registry import (fusion_metric, promote_best, register_detector,  # noqa: E402
                       register_detectors, register_fusions, registered_model_name)
from .runs import record_pipeline  # noqa: E402

__all__ = ["Tracker", "record_pipeline", "DetectorPyfunc", "FusionPyfunc",
           "registered_model_name", "register_detector", "register_detectors",
           "register_fusions", "promote_best", "fusion_metric", "parse_model_ref",
           "resolve_model", "load_model", "log_scoring_batch"]
