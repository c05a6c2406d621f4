"""Comparison tables of methods' metrics, and their fixed-width text for the terminal."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ..errors import DefectflowError


# The metric columns of a comparison table, in the order they are shown.
METRIC_COLUMNS = (
    "image_auroc",
    "image_aupr",
    "pixel_auroc",
    "pixel_aupr",
    "aupro",
    "spro",
    "f1_max",
    "fpr_at_95_tpr",
)


# How the terminal shows a column (format_table's ``titles``); others show their name.
COLUMN_TITLES = {
    "image_auroc": "image AUROC",
    "image_aupr": "image AUPR",
    "pixel_auroc": "pixel AUROC",
    "pixel_aupr": "pixel AUPR",
    "aupro": "AUPRO",
    "spro": "sPRO",
    "f1_max": "F1-max (test-tuned)",
    "fpr_at_95_tpr": "FPR@95%TPR",
    "image_auroc_std": "± std",
    "recall": "recall@thr",
    "escape_rate": "escapes@thr",
    "false_alarm_rate": "false alarms@thr",
    "threshold": "threshold",
}

# A run's comparison: ranking quality, then what the deployed threshold does on the line.
THRESHOLD_COLUMNS = ("image_auroc", "pixel_auroc", "recall", "escape_rate", "false_alarm_rate",
                     "threshold", "f1_max")

# The legend printed under a table with those columns.
THRESHOLD_NOTE = ("@thr: at the threshold the model uses (0.99 quantile of held-out good "
                  "images' scores, no test label); escapes = defective parts passed as good "
                  "(1 - recall); false alarms = good parts flagged. F1-max picks its threshold "
                  "with the test labels: an optimistic reference, not an operating point.")


def comparison_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per method (detectors and fusion alike), best ``image_auroc`` first.

    Each row is a dict with a ``method`` name and its metrics, and optionally a
    ``category``: then a row is one (category, method), the table starts with the
    ``category`` column and is sorted by category first. Columns are those names, then
    ``columns`` in that order when given, else the :data:`METRIC_COLUMNS` that any row
    has, then any other keys in the order first seen; missing values are NaN. Rows are
    sorted by ``image_auroc`` descending, NaN last, ties in the given order.
    """
    if not rows:
        raise DefectflowError("no methods to compare")
    for index, row in enumerate(rows):
        if "method" not in row:
            raise DefectflowError(f"comparison row #{index} has no 'method' name")
    names = ["category", "method"] if any("category" in row for row in rows) else ["method"]
    identities = [" / ".join(str(row.get(name)) for name in names) for row in rows]
    repeated = sorted({name for name in identities if identities.count(name) > 1})
    if repeated:
        raise DefectflowError(f"methods listed more than once: {', '.join(repeated)}")

    table = pd.DataFrame(list(rows))
    if columns is None:
        metrics = [column for column in METRIC_COLUMNS if column in table.columns]
        others = [column for column in table.columns if column not in names + metrics]
        columns = [*metrics, *others]
    table = table.reindex(columns=[*names, *columns])
    order = [name for name in names if name == "category"]
    if "image_auroc" in table.columns:
        order.append("image_auroc")
    if order:
        table = table.sort_values(order, ascending=[name != "image_auroc" for name in order],
                                  kind="stable", na_position="last")
    return table.reset_index(drop=True)


def format_table(table: pd.DataFrame, digits: int = 3,
                 titles: Mapping[str, str] | None = None) -> str:
    """Fixed-width text of a table for the terminal.

    The header shows each column's entry in ``titles`` (e.g. :data:`COLUMN_TITLES`),
    else its name, above a rule. Floats get ``digits`` decimals, missing values show as
    ``-``; numeric columns are right-aligned, others left-aligned; two spaces between
    columns.
    """

    def cell(value: object) -> str:
        if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
            return "-"
        if isinstance(value, (float, np.floating)):
            return f"{value:.{digits}f}"
        return str(value)

    titles = titles or {}
    header = [str(titles.get(column, column)) for column in table.columns]
    body = [[cell(value) for value in row] for row in table.itertuples(index=False, name=None)]
    numeric = [pd.api.types.is_numeric_dtype(table[column]) for column in table.columns]
    widths = [max([len(header[j])] + [len(row[j]) for row in body]) for j in range(len(header))]

    def line(cells: list[str]) -> str:
        parts = [
            text.rjust(width) if right else text.ljust(width)
            for text, width, right in zip(cells, widths, numeric)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), rule, *(line(row) for row in body)])


def markdown_table(table: pd.DataFrame, digits: int = 4,
                   titles: Mapping[str, str] | None = None) -> str:
    """The table as GitHub markdown (MLflow descriptions, Prefect artifacts): ``titles`` as
    in :func:`format_table`, numbers right-aligned, missing values ``-``."""
    titles = titles or {}

    def cell(value: object) -> str:
        if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
            return "-"
        return f"{value:.{digits}f}" if isinstance(value, (float, np.floating)) else str(value)

    numeric = [pd.api.types.is_numeric_dtype(table[column]) for column in table.columns]
    lines = ["| " + " | ".join(str(titles.get(c, c)) for c in table.columns) + " |",
             "|" + "|".join("---:" if right else "---" for right in numeric) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |"
              for row in table.itertuples(index=False, name=None)]
    return "\n".join(lines)
