"""What a pipeline's flow run shows in the Prefect UI: its name and tags, a markdown artifact
with the results table and the MLflow run id, and the result lines in the flow run's logs.

The result lines go to Prefect's API only (not to the console, where the CLI prints the
same table once).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..tasks.evaluation import (COLUMN_TITLES, THRESHOLD_COLUMNS, THRESHOLD_NOTE,
                                comparison_table, format_table, markdown_table)
from ..tasks.params import FUSION_METHOD, PipelineParams
from ..tasks.results import PipelineSummary

_RESULTS_LOGGER = "defectflow.results"


def flow_run_name(params: PipelineParams, params_path: str | Path | None) -> str:
    """``<dataset>-<params file stem>`` (``-defaults`` without a params file)."""
    return f"{params.dataset_name}-{Path(params_path).stem if params_path else 'defaults'}"


def flow_run_tags(params: PipelineParams) -> list[str]:
    """The dataset's name and every method (and the fusion when it runs)."""
    methods = sorted(params.methods)
    if params.fusion.enabled and len(methods) >= 2 and params.patches.size is None:
        methods.append(FUSION_METHOD)
    return [params.dataset_name, *methods]


def results_table(summary: PipelineSummary):
    rows = [r.row() for r in summary.results]
    return comparison_table(rows, columns=[c for c in THRESHOLD_COLUMNS
                                           if any(r.get(c) is not None for r in rows)])


def report(summary: PipelineSummary) -> None:
    """The results as a markdown artifact of the flow run, and its lines in the run's logs."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.logging.handlers import APILogHandler

    table = results_table(summary)
    markdown = "\n".join([
        f"# {summary.experiment}: results", "",
        f"MLflow experiment `{summary.experiment}` (id {summary.experiment_id}), "
        f"parent run `{summary.parent_run_id}`"
        + (" (every step cached)" if summary.all_steps_cached else ""), "",
        markdown_table(table, titles=COLUMN_TITLES), "", THRESHOLD_NOTE, "",
        f"{summary.ui_hint}", "", f"total time: {summary.total_seconds:.1f} s"])
    create_markdown_artifact(markdown=markdown, key="defectflow-results",
                             description=f"{summary.experiment}: detectors compared")
    logger = logging.getLogger(_RESULTS_LOGGER)
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        logger.addHandler(APILogHandler())  # to the flow run's logs only, not the console
        logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.info("MLflow parent run %s (experiment %s)", summary.parent_run_id,
                summary.experiment)
    for line in format_table(table, digits=4, titles=COLUMN_TITLES).splitlines():
        logger.info(line)
    logger.info("total time: %.1f s", summary.total_seconds)
    APILogHandler().flush()  # sent before the flow run ends, not whenever the worker wakes
