"""Where the pipeline's tasks run: the task runner chosen by ``execution`` in params.

``thread`` (default): Prefect's ThreadPoolTaskRunner in the flow's process, ``max_workers``
steps at a time. ``dask``: prefect-dask's DaskTaskRunner, on a running scheduler
(``dask_address``) or on a LocalCluster started for the run. Either way MLflow is written
once, from the flow's process, after every step has finished.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

from ..tasks import cores
from ..tasks.errors import DefectflowError
from ..tasks.params import ExecutionParams, PipelineParams
from .pipeline import pipeline
from .report import flow_run_name, flow_run_tags


def make_task_runner(execution: ExecutionParams):
    """A fresh Prefect task runner for ``execution`` (one per flow call)."""
    if execution.task_runner == "thread":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=execution.max_workers)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise DefectflowError("execution.task_runner: dask needs prefect-dask "
                              "(pip install 'defectflow[dask]')") from None
    if execution.dask_address:
        # Workers of a remote cluster need PREFECT_API_URL of a real Prefect server themselves.
        return DaskTaskRunner(address=execution.dask_address)
    return DaskTaskRunner(cluster_class=_local_cluster, cluster_kwargs={
        "n_workers": execution.dask_n_workers,
        "threads_per_worker": execution.dask_threads_per_worker,
        "processes": execution.dask_processes})


def _local_cluster(**kwargs):
    """A LocalCluster whose worker processes report to the flow's Prefect API.

    Called inside the flow run (the runner starts its cluster lazily), when the API is known:
    without PREFECT_API_URL, Prefect runs a temporary server for this process only, and each
    worker process would otherwise start (and wait ~20 s for) one of its own.
    """
    from distributed import LocalCluster
    from prefect.settings import PREFECT_API_URL

    # Dask's start-up and shutdown lines at INFO would bury the step log.
    logging.getLogger("distributed").setLevel(os.environ.get("PREFECT_LOGGING_LEVEL", "WARNING"))

    api = PREFECT_API_URL.value()
    if not api:
        from prefect.server.api.server import SubprocessASGIServer

        api = SubprocessASGIServer().api_url  # the singleton this process's client uses
    # Dask's nanny already gives each worker process OMP/MKL threads = 1.
    env = {"PREFECT_API_URL": api}
    # A dashboard on a free port: two runs at once must not compete for :8787.
    return LocalCluster(dashboard_address=":0", env=env, **kwargs)


@contextmanager
def torch_threads_for(execution: ExecutionParams):
    """Share the CPU cores among the thread-runner steps that run at the same moment
    (``tasks/cores.py``): a step running alone gets every core, two get half each.
    Dask workers get one thread each from Dask itself."""
    if execution.task_runner != "thread":
        yield
        return
    import torch

    before = torch.get_num_threads()
    try:
        with cores.shared(before):
            yield
    finally:
        torch.set_num_threads(before)


def run_pipeline(params: PipelineParams, verbose: bool = True,
                 params_path: str | None = None, started: float | None = None) -> dict:
    """Run the pipeline flow on the task runner its params choose; returns its summary.
    The flow run is named ``<dataset>-<params file stem>`` and tagged with the dataset and
    methods, so runs tell apart in the Prefect UI; ``started``: see ``pipeline``."""
    from prefect import tags

    with torch_threads_for(params.execution), tags(*flow_run_tags(params)):
        return pipeline.with_options(task_runner=make_task_runner(params.execution),
                                     flow_run_name=flow_run_name(params, params_path))(
            params, verbose=verbose, started=started)
