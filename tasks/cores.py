"""torch's threads for steps that run side by side in one process.

torch runs every op on all cores by default; two steps at once in one process
(the thread task runner) would run twice as many threads as cores, and
OpenMP's busy waiting made such oversubscribed runs many times slower on 2
cores. A flow that runs steps side by side opens :func:`shared` for its
duration and runs each torch-heavy step inside :func:`step`: the cores are
then divided by the number of such steps running at each moment, so a step
running alone gets every core.

torch's thread count is a per-thread setting once a thread sets it, so one
step cannot change another's: long loops (feature extraction batches,
``PatchSet`` feature chunks and input batches, scoring pieces) call
:func:`follow` to take up the current share. Outside :func:`shared` every
function here does nothing.
"""

from __future__ import annotations

import functools
import threading
from contextlib import contextmanager

_lock = threading.Lock()
_cores: int | None = None  # the cores shared during a flow; None: nothing is shared
_running = 0               # torch-heavy steps running now


@contextmanager
def shared(cores: int):
    """Divide ``cores`` among the :func:`step` blocks that run while this block runs."""
    global _cores, _running
    with _lock:
        _cores, _running = cores, 0
    try:
        yield
    finally:
        with _lock:
            _cores = None


@contextmanager
def step():
    """Count the calling thread's work among the running steps while the block runs."""
    global _running
    with _lock:
        sharing = _cores is not None
        if sharing:
            _running += 1
    if not sharing:  # no flow shares the cores (a Dask worker, a direct call)
        yield
        return
    try:
        follow()
        yield
    finally:
        with _lock:
            _running -= 1


def follow() -> None:
    """Set this thread's torch threads to the current share of the cores (cheap: call it
    once per batch in long loops)."""
    cores, running = _cores, _running
    if cores is None:
        return
    import torch

    want = max(1, cores // max(1, running))
    if torch.get_num_threads() != want:
        torch.set_num_threads(want)


def shares_cores(fn):
    """``fn`` (a torch-heavy step) counted among the running steps while it runs.

    ``functools.wraps`` keeps ``fn``'s signature and source for Prefect's cache key.
    """
    @functools.wraps(fn)
    def counted(*args, **kwargs):
        with step():
            return fn(*args, **kwargs)

    return counted
