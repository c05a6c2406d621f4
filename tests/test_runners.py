"""Task runners: steps run concurrently on the flow's task runner, keep their declared order,
recompute a cached result whose files are gone, and the Dask runner gives the same metrics
as the default thread runner."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import yaml

from conftest import make_folder_dataset
from defectflow.cli import main


@pytest.fixture
def one_torch_thread():
    """torch on one thread, as in each Dask worker: float sums in the same order on both
    runners (a lone thread-runner step otherwise gets every core, and PaDiM's thresholds
    then differ in the 6th significant digit)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_params(tmp: Path, data: Path, runner: str) -> Path:
    params = {
        "dataset": {"layout": "folder", "path": str(data), "name": "generated"},
        "features": {"input_size": 64},
        # Two methods: their train/score/evaluate chains run side by side.
        "methods": {"patchcore": {"coreset_ratio": 0.5}, "padim": {}},
        "evaluation": {"overlays": 0, "plots": False},
        "fusion": {"enabled": False},
        "categorization": {"n_clusters": 2, "max_side": 32},
        # One MLflow store (created once), one experiment per runner.
        "tracking": {"uri": f"sqlite:///{tmp.parent / 'mlflow.db'}", "experiment": runner},
        "cache_dir": str(tmp / "cache"),  # one cache per runner: the second run recomputes
        "execution": {"task_runner": runner, "max_workers": 2, "dask_n_workers": 2,
                      "dask_threads_per_worker": 1},
    }
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def child_metrics(tmp: Path, experiment: str) -> tuple[dict, dict]:
    """{(category, method): metrics} of the child runs, and the parent run's metrics."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    children = {(r.data.tags["category"], r.data.tags["method"]): r.data.metrics
                for r in runs if r.data.tags.get("mlflow.parentRunId")}
    parent = next(r for r in runs if not r.data.tags.get("mlflow.parentRunId"))
    return children, parent.data.metrics


def test_dask_runner_gives_the_same_metrics_as_the_thread_runner(tmp_path, one_torch_thread):
    pytest.importorskip("prefect_dask", reason="the dask extra (prefect-dask) is not installed")
    data = make_folder_dataset(tmp_path / "product", n_good=20, n_bad=6)
    metrics = {}
    for runner in ("thread", "dask"):
        (tmp_path / runner).mkdir()
        assert main(["run", str(write_params(tmp_path / runner, data, runner)), "--quiet"]) == 0
        children, parent = child_metrics(tmp_path, runner)
        assert parent["steps_cached"] == 0  # its own cache: every step really ran
        metrics[runner] = children
    assert set(metrics["thread"]) == {("product", "patchcore"), ("product", "padim")}
    assert set(metrics["dask"]) == set(metrics["thread"])
    for key, thread_metrics in metrics["thread"].items():
        assert thread_metrics["image_auroc"] >= 0.9, key
        assert set(metrics["dask"][key]) == set(thread_metrics), key
        for name, value in thread_metrics.items():
            assert metrics["dask"][key][name] == pytest.approx(value, abs=1e-6), (key, name)


# -- the step scheduler (flows/steplog.py) on trivial tasks -----------------------------
_both_running = threading.Barrier(2, timeout=60)


def _meet():
    """Returns only when the other call runs at the same time (or fails after 60 s)."""
    _both_running.wait()
    return threading.get_ident()


def _make_file(folder: str, name: str):
    from defectflow.tasks.cache import Ref

    path = Path(folder) / name
    path.write_text(name)
    return Ref(str(path), name)


def _read(ref, suffix: str) -> str:
    return Path(ref.path).read_text() + suffix


def test_steps_run_concurrently_in_declared_order_and_recompute_deleted_results(tmp_path):
    from prefect import flow, task
    from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE
    from prefect.task_runners import ThreadPoolTaskRunner

    from defectflow.flows.steplog import StepLog

    meet = task(_meet, cache_policy=NO_CACHE)
    make_file = task(_make_file, cache_policy=INPUTS + TASK_SOURCE, persist_result=True)
    read = task(_read, cache_policy=NO_CACHE)

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=2))
    def steps_flow(folder: str):
        log = StepLog(verbose=False)
        made = log.submit("make", make_file, folder, "a.txt")
        first, second = log.submit("meet 1", meet), log.submit("meet 2", meet)
        derived = log.then(made, lambda ref: {"ref": ref})
        text = log.submit("read", read, made, suffix="!")  # waits for "make"
        return log.gather((first, second, text, derived)), log.rows

    (first, second, text, derived), rows = steps_flow(str(tmp_path))
    assert first != second  # two worker threads met at the barrier: they ran concurrently
    assert text == "a.txt!" and derived["ref"].path == str(tmp_path / "a.txt")
    assert [r["step"] for r in rows] == ["make", "meet 1", "meet 2", "read"]
    assert rows[0]["status"] == "ran"

    # Same inputs: cached. Then with the file deleted: the cached result is recomputed.
    _, rows = steps_flow(str(tmp_path))
    assert rows[0]["status"] == "cached"
    (tmp_path / "a.txt").unlink()
    (_, _, text, _), rows = steps_flow(str(tmp_path))
    assert rows[0]["status"] == "ran" and text == "a.txt!" and (tmp_path / "a.txt").exists()


@pytest.fixture
def four_torch_threads():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


def test_cores_are_divided_among_the_steps_running_at_that_moment(four_torch_threads):
    import torch

    from defectflow.flows.runners import torch_threads_for
    from defectflow.tasks.cores import shares_cores
    from defectflow.tasks import cores
    from defectflow.tasks.params import ExecutionParams

    seen: dict[str, list[int]] = {"first": [], "second": []}
    first_started, second_started = threading.Event(), threading.Event()
    first_followed, second_done = threading.Event(), threading.Event()

    @shares_cores
    def alone():
        return torch.get_num_threads()

    @shares_cores
    def first():
        seen["first"].append(torch.get_num_threads())  # alone so far: every core
        first_started.set()
        second_started.wait(30)
        cores.follow()  # a batch loop takes up the new share
        seen["first"].append(torch.get_num_threads())
        first_followed.set()
        second_done.wait(30)
        cores.follow()  # alone again
        seen["first"].append(torch.get_num_threads())

    @shares_cores
    def second():
        seen["second"].append(torch.get_num_threads())
        second_started.set()  # inside the step: it counts among the running ones
        first_followed.wait(30)

    def second_when_first_runs():
        first_started.wait(30)
        try:
            second()
        finally:
            second_done.set()

    assert alone.__wrapped__.__name__ == "alone"  # Prefect's cache key sees the step itself
    with torch_threads_for(ExecutionParams(task_runner="thread", max_workers=2)):
        assert alone() == 4  # a step on its own gets every core
        workers = [threading.Thread(target=first), threading.Thread(target=second_when_first_runs)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    assert seen == {"first": [4, 2, 4], "second": [2]}
    # Outside a flow (a Dask worker, a direct call) a step leaves torch's threads alone.
    torch.set_num_threads(3)
    assert alone() == 3
    with torch_threads_for(ExecutionParams(task_runner="dask")):
        assert alone() == 3


def test_laters_inside_dataclasses_are_waited_for_and_resolved():
    from defectflow.flows.steplog import Later, _laters, resolve
    from defectflow.tasks.results import DetectorResult, FusionResult
    from defectflow.tasks.cache import Ref

    fused = Later(0, "fusion", None, (), {})
    pending = [FusionResult(category="c", fusion=fused)]
    assert _laters(pending) == [fused]  # a step taking it waits for the fusion
    fused.value, fused.done = Ref("/x", "k"), True
    assert resolve(pending) == [FusionResult(category="c", fusion=Ref("/x", "k"))]
    plain = DetectorResult("c", "m", {}, {}, Ref("/a", "1"), Ref("/b", "2"), None, Ref("/c", "3"))
    assert resolve(plain) is plain  # nothing pending: the same object
