"""What the MLflow UI shows of an experiment without the user clicking around.

- ``EXPERIMENT_TAGS``: the experiment opens in MLflow's model-training view (not the GenAI
  one, whose sidebar offers traces, judges and prompts), with ``image_auroc`` as its
  primary metric in the charts;
- ``shared_view``: a runs-table view stored on the experiment (MLflow's "share" mechanism:
  the tag ``mlflow.sharedViewState.<key>``, opened by ``?viewStateShareKey=<key>``): the
  detector and fusion runs as flat rows, with each method's AUROCs, recall, escape and
  false-alarm rates at its threshold, and the ``method`` / ``category`` tags as columns;
- ``ui_hint``: the one line that tells how to open that view on this store (MLflow 3.17's
  sidebar takes its GenAI / model-training switch from the ``workflowType`` URL parameter
  before the experiment's tag, so the link sets both);
- ``description``: the parent run's description (``mlflow.note.content``), a markdown
  table of the run's comparison, shown on the run's page.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from ..evaluation.tables import (COLUMN_TITLES, THRESHOLD_COLUMNS, THRESHOLD_NOTE,
                                 comparison_table, markdown_table)
from ..results import ComparisonRow
from .store import sqlite_path

# MLflow's experiment kinds (its UI's ExperimentKind enum): the classic training view.
EXPERIMENT_KIND = "custom_model_development"
VIEW_KEY = "defectflow"
SHARED_VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"

def _column(kind: str, name: str) -> str:
    return f"{kind}.`{name}`"  # the UI's canonical column key


def shared_view() -> dict:
    """The runs-table state MLflow's UI loads from the experiment's shared-view tag."""
    columns = [_column("tags", "category"), _column("tags", "method")]
    columns += [_column("metrics", name) for name in THRESHOLD_COLUMNS]
    columns.append(_column("attributes", "Duration"))
    return {
        "selectedColumns": columns,
        "columnOrder": columns,
        # Only runs with a method tag: the detector and fusion runs, as flat rows (their
        # parent would otherwise show as one collapsed row).
        "searchFilter": "tags.method LIKE '%'",
        "orderByKey": _column("metrics", "image_auroc"),
        "orderByAsc": False,
        "viewMaximized": False,
        "runsHiddenMode": "SHOW_ALL",
    }


EXPERIMENT_TAGS = {
    "mlflow.experimentKind": EXPERIMENT_KIND,
    "mlflow.experiment.primaryMetric.name": "image_auroc",
    SHARED_VIEW_TAG: json.dumps(shared_view()),
}


def ui_hint(uri: str, experiment_id: str) -> str:
    """How to open the comparison view of this store's experiment, in one line."""
    path = (f"#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}"
            "&workflowType=machine_learning")
    if uri.startswith(("http://", "https://")):
        return f"MLflow UI: {uri.rstrip('/')}/{path}"
    store = uri
    database = sqlite_path(uri) if uri.startswith("sqlite:") else None
    if database is not None:  # absolute: the command must work from any folder
        store = f"sqlite:///{database.resolve()}"
    return (f"MLflow UI: mlflow ui --backend-store-uri {store} --port 5000, then open "
            f"http://127.0.0.1:5000/{path}")


def description(rows: Sequence[ComparisonRow], title: str) -> str:
    """A markdown table: one line per (category, method), the comparison's metrics at the
    deployed threshold, and the legend."""
    table = comparison_table([r.row() for r in rows], columns=[
        c for c in THRESHOLD_COLUMNS if any(r.metrics.get(c) is not None for r in rows)])
    return "\n".join([f"**{title}**", "", markdown_table(table, titles=COLUMN_TITLES), "",
                      THRESHOLD_NOTE])
