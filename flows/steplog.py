"""Submitting the pipeline's steps to the flow's task runner, and what each step did.

``StepLog.submit`` returns a ``Later``: a step's result that is not there yet. Laters can
be passed to later steps (also inside dicts, lists, tuples and dataclasses); a step is
submitted to the task runner as soon as every Later in its inputs is finished, with their
values in its place. So the flow reads like the sequential code it replaces while
independent categories and methods run side by side. Resolving inputs here (not handing
Prefect futures to Prefect) keeps two behaviours of the sequential flow:

- a cached result whose files were deleted is computed again (``refresh_cache``) before
  anything downstream sees it: every reference a step returns (``Ref``, ``FeatureStoreRef``,
  ``ScanRefs``, also inside dicts, lists, tuples and dataclasses) says with ``exists()``
  whether its files are still there; and before a step is submitted, an input whose files
  are gone has the step that made it computed again first;
- every step's task inputs are plain values, so its cache key is the same whichever task
  runner runs it, and a second identical run is fully cached.

Each finished step is printed as it finishes: ran or cached, its own run time (measured
inside the worker by ``timed``) and, separately, how long it waited for a worker, a lock or
a cached result; and kept in a row for MLflow's ``steps.csv`` (with its start and end, epoch
seconds), in the order the flow declared it. On a terminal one status line below the step
lines shows what is running; when the output is a file or a pipe there is none.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import queue
import shutil
import sys
import threading
import time
from typing import Any, Callable

from prefect.runtime import task_run

# Start and end (epoch seconds) of each task run's own work, by Prefect task-run id, written
# by ``timed`` in the worker thread (a process-wide dict: the thread runner's workers share
# it; steps run elsewhere, e.g. on Dask, are timed from submission to end instead).
_RUN_TIMES: dict[str, list[float]] = {}
_RUN_TIMES_LOCK = threading.Lock()


def _start_timing() -> list[float]:
    """This task run's [start] in ``_RUN_TIMES``; the caller appends its end."""
    times = [time.time()]
    with _RUN_TIMES_LOCK:
        _RUN_TIMES[str(task_run.id)] = times
    return times


def timed(fn: Callable) -> Callable:
    """``fn`` recording when its own work starts and ends in its task run (``_RUN_TIMES``).
    ``functools.wraps`` keeps ``fn``'s signature and source for Prefect's cache key. The
    wrapper refers only to importable functions (no lock of its own), so Dask can pickle it."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        times = _start_timing()
        try:
            return fn(*args, **kwargs)
        finally:
            times.append(time.time())

    return run


def _run_times(future) -> list[float] | None:
    with _RUN_TIMES_LOCK:
        return _RUN_TIMES.pop(str(getattr(future, "task_run_id", "")), None)


def _started(future) -> float | None:
    with _RUN_TIMES_LOCK:
        times = _RUN_TIMES.get(str(getattr(future, "task_run_id", "")))
    return times[0] if times else None


class Later:
    """The pending result of one submitted step (or of a function of another Later)."""

    def __init__(self, index: int, label: str, step, args: tuple, kwargs: dict,
                 derive: Callable | None = None):
        self.index, self.label, self.step = index, label, step
        self.args, self.kwargs, self.derive = args, kwargs, derive
        self.deps = _laters((args, kwargs))
        self.future = None
        self.submitted = self.finished = 0.0  # epoch seconds
        self.refreshed = False
        self.done = False
        self.value: Any = None

    def then(self, fn: Callable) -> "Later":
        """``fn(value)`` once this step is done, computed in the flow (no task of its own)."""
        return Later(-1, f"{self.label} (then)", None, (self,), {}, derive=fn)


def _parts(obj) -> list:
    """The values inside a dict, list, tuple or dataclass instance; [] for anything else."""
    if isinstance(obj, dict):
        return list(obj.values())
    if isinstance(obj, (list, tuple)):
        return list(obj)
    if _is_dataclass(obj):
        return [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    return []


def _laters(obj) -> list[Later]:
    if isinstance(obj, Later):
        return [obj]
    return [x for v in _parts(obj) for x in _laters(v)]


def _is_dataclass(obj) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def missing_refs(obj) -> list:
    """The references in ``obj`` (also inside dicts, lists, tuples and dataclasses) whose
    ``exists()`` says their files are gone."""
    # Paths are inputs to be made, not outputs that were: only descriptors are asked.
    if callable(getattr(obj, "exists", None)) and not isinstance(obj, (type, os.PathLike)):
        return [] if obj.exists() else [obj]
    return [x for v in _parts(obj) for x in missing_refs(v)]


def _holds(value, ref) -> bool:
    """Whether ``ref`` is ``value`` or one of its parts."""
    if value is ref or (type(value) is type(ref) and value == ref):
        return True
    return any(_holds(v, ref) for v in _parts(value))


def resolve(obj):
    """``obj`` with every finished Later replaced by its value (dicts, lists, tuples, and
    the init fields of dataclasses: a dataclass without Laters is returned as it is)."""
    if isinstance(obj, Later):
        assert obj.done, obj.label
        return obj.value
    if isinstance(obj, dict):
        return {k: resolve(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [resolve(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(resolve(v) for v in obj)
    if _is_dataclass(obj) and _laters(obj):
        return dataclasses.replace(obj, **{f.name: resolve(getattr(obj, f.name))
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


class StepLog:
    """Runs steps on the flow's task runner as their inputs become ready; records each one."""

    def __init__(self, verbose: bool = True, status_line: bool | None = None):
        self.verbose = verbose
        # One status line of what is running, on a terminal only (a file gets none).
        self.status_line = (verbose and sys.stdout.isatty()) if status_line is None \
            else status_line
        self._status_shown = False
        self._rows: dict[int, dict] = {}  # by the step's index: a step run again keeps one row
        self._done: list[Later] = []        # finished steps, whose outputs later steps read
        self._waiting: list[Later] = []
        self._running: set[Later] = set()
        self._finished: queue.Queue[Later] = queue.Queue()  # filled by the futures' callbacks
        self._count = 0

    @property
    def rows(self) -> list[dict]:
        """One row per finished step, in the flow's order: step, status, seconds (its own
        run time), wait_seconds (from submission to its start), started, ended (epoch)."""
        return [row for _, row in sorted(self._rows.items())]

    # -- declaring steps -----------------------------------------------------------------
    def submit(self, label: str, step, *args, **kwargs) -> Later:
        """Run ``step`` (a Prefect task) once the Laters among its inputs are finished."""
        later = Later(self._count, label, step, args, kwargs)
        self._count += 1
        self._add(later)
        return later

    def then(self, later: Later, fn: Callable) -> Later:
        derived = later.then(fn)
        self._add(derived)
        return derived

    def run(self, label: str, step, *args, **kwargs):
        """Submit ``step`` and wait for its value (for values the flow itself needs)."""
        later = self.submit(label, step, *args, **kwargs)
        self.wait(until=later)
        return later.value

    def gather(self, obj):
        """Wait for every declared step; ``obj`` with its Laters replaced by their values."""
        self.wait()
        return resolve(obj)

    # -- scheduling --------------------------------------------------------------------
    def _add(self, later: Later) -> None:
        self._waiting.append(later)
        self._start_ready()

    def _start_ready(self) -> None:
        while True:
            ready = [w for w in self._waiting if all(d.done for d in w.deps)]
            if not ready:
                return
            for later in ready:
                if later.derive is not None:
                    self._waiting.remove(later)
                    later.value, later.done = later.derive(resolve(later.args[0])), True
                elif not self._refresh_inputs(later):
                    self._waiting.remove(later)
                    later.submitted = time.time()
                    self._submit(later)

    def _refresh_inputs(self, later: Later) -> bool:
        """Compute again the finished steps that made inputs of ``later`` whose files are
        gone; ``later`` then waits for them. False when there is nothing to refresh."""
        gone = missing_refs((resolve(later.args), resolve(later.kwargs)))
        makers = [d for d in self._done
                  if not d.refreshed and any(_holds(d.value, ref) for ref in gone)]
        for maker in makers:
            maker.done, maker.refreshed = False, True
            maker.submitted = time.time()
            self._submit(maker, refresh=True)
            later.deps.append(maker)
        return bool(makers)

    def _submit(self, later: Later, refresh: bool = False) -> None:
        options: dict[str, Any] = {"task_run_name": later.label}
        if refresh:
            options["refresh_cache"] = True
        future = later.step.with_options(**options).submit(*resolve(later.args),
                                                           **resolve(later.kwargs))
        later.future = future
        self._running.add(later)

        def finished(_future, later=later):
            later.finished = time.time()
            self._finished.put(later)

        future.add_done_callback(finished)

    def wait(self, until: Later | None = None) -> None:
        """Handle finished steps (and start what they unblock) until ``until`` or all are done."""
        self._start_ready()
        while (not until.done) if until is not None else (self._waiting or self._running):
            if not self._running:
                raise RuntimeError(f"steps wait on inputs that never come: "
                                   f"{[w.label for w in self._waiting]}")
            try:
                finished = self._finished.get(timeout=1.0 if self.status_line else None)
            except queue.Empty:
                self._show_status()
                continue
            self._finish(finished)
            self._start_ready()
        self._clear_status()

    def _show_status(self) -> None:
        """Rewrite the status line: the steps whose own work has started, with their time."""
        if not self.status_line:
            return
        now = time.time()
        running = [(later.label, now - started) for later in sorted(self._running,
                                                                    key=lambda x: x.index)
                   if (started := _started(later.future)) is not None]
        text = "  running: " + ", ".join(f"{label} {seconds:.0f} s"
                                         for label, seconds in running) if running else ""
        width = shutil.get_terminal_size((100, 20)).columns - 1
        sys.stdout.write("\r\033[K" + text[:width])
        sys.stdout.flush()
        self._status_shown = bool(text)

    def _clear_status(self) -> None:
        if self._status_shown:
            sys.stdout.write("\r\033[K")
            sys.stdout.flush()
            self._status_shown = False

    def _finish(self, later: Later) -> None:
        self._running.discard(later)
        value = later.future.result()  # a failed step raises its own error here
        if missing_refs(value) and not later.refreshed:
            # Prefect remembered a result whose files were deleted: compute it again.
            later.refreshed = True
            self._submit(later, refresh=True)
            return
        status = "cached" if later.future.state.name == "Cached" else "ran"
        own = _run_times(later.future) if status == "ran" else None
        if own is not None and len(own) == 2:
            started, ended = own
        else:  # cached (its work was done before) or run out of this process
            started, ended = later.submitted, later.finished
        later.value, later.done = value, True
        if later not in self._done:
            self._done.append(later)
        seconds, waited = ended - started, max(0.0, started - later.submitted)
        self._rows[later.index] = {"step": later.label, "status": status,
                                   "seconds": round(seconds, 2),
                                   "wait_seconds": round(waited, 2),
                                   "started": started, "ended": ended}
        if self.verbose:
            self._clear_status()
            wait = f"  (waited {waited:.1f} s)" if waited >= 0.5 else ""
            print(f"  {later.label:<40} {status:>6}  {seconds:7.1f} s{wait}", flush=True)
            self._show_status()
