"""Content-addressed outputs on disk: ``Ref``, and the write-beside-then-rename idiom, once.

A step's output lives at ``<cache_dir>/<kind>/<key>[suffix]``. It is written under a
partial name beside that place (``<name>.partial-<pid>``) and renamed into it when
complete, so an interrupted step never leaves an output that looks finished, and two
processes making the same key never see each other's half-written files. A partial
whose process is gone (killed) is removed by :func:`remove_stale_partials`.

A full disk while writing is one :class:`DefectflowError` ("no space left on device
writing <path>"), and the partial is removed. Arrays streamed through a memory map
reserve their whole size first (:func:`allocated_memmap`): a full disk is then an
``OSError`` at allocation, not a SIGBUS at the first page written.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DefectflowError

# ENOSPC: the device is full; EDQUOT: the user's quota is.
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


@dataclass(frozen=True)
class Ref:
    """A content-addressed output on disk: a file or folder, and the key it was made under."""

    path: str
    key: str

    def exists(self) -> bool:
        return Path(self.path).exists()

    def table(self) -> pd.DataFrame:
        return pd.read_parquet(self.path)


@dataclass(frozen=True)
class FolderWrite:
    """A folder output being made: write into ``partial`` while ``missing``."""

    path: Path      # the final folder
    partial: Path   # beside it; renamed to ``path`` when the block ends without an error
    missing: bool   # False: the folder is already there and nothing is to be written
    key: str = ""

    @property
    def ref(self) -> Ref:
        return Ref(str(self.path), self.key)


def cache_path(cache_dir: str | Path, kind: str, key: str, suffix: str = "") -> Path:
    """``<cache_dir>/<kind>/<key><suffix>``, its parent folder created."""
    path = Path(cache_dir) / kind / f"{key}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def partial_path(final: Path) -> Path:
    """Where ``final`` is written before it is complete (one name per process)."""
    return final.with_name(f"{final.name}.partial-{os.getpid()}")


def is_disk_full(error: BaseException) -> bool:
    """An OSError of a full device or quota (pyarrow's carry the text, not the errno)."""
    return isinstance(error, OSError) and (
        error.errno in _DISK_FULL
        or any(os.strerror(code) in str(error) for code in _DISK_FULL))


def disk_full_error(path: str | Path) -> DefectflowError:
    return DefectflowError("no space left on device writing this output (free some space, "
                           "or set cache_dir to another disk)", path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def written_folder(final: Path, key: str = "") -> Iterator[FolderWrite]:
    """Make the folder ``final`` whole or not at all.

    When ``final`` exists, the block sees ``missing`` False and nothing happens. Otherwise
    ``partial`` is created empty, and when the block ends it is renamed to ``final``; if
    another process finished the same folder first, theirs is kept and ours dropped. A
    block that raises leaves nothing behind; a full disk raises DefectflowError.
    """
    out = FolderWrite(final, partial_path(final), not final.exists(), key)
    if not out.missing:
        yield out
        return
    shutil.rmtree(out.partial, ignore_errors=True)
    try:
        out.partial.mkdir(parents=True)
    except OSError as error:
        if is_disk_full(error):
            raise disk_full_error(final) from error
        raise
    try:
        yield out
    except BaseException as error:
        shutil.rmtree(out.partial, ignore_errors=True)
        if is_disk_full(error):
            raise disk_full_error(final) from error
        raise
    if final.exists():
        shutil.rmtree(out.partial, ignore_errors=True)
    else:
        out.partial.rename(final)


def cached_folder(cache_dir: str | Path, kind: str, key: str,
                  suffix: str = "") -> AbstractContextManager[FolderWrite]:
    """``written_folder`` at ``<cache_dir>/<kind>/<key><suffix>``; ``.ref`` is its ``Ref``.

        with cached_folder(cache_dir, "scores", key) as out:
            if out.missing:
                ...  # write into out.partial
        return out.ref
    """
    return written_folder(cache_path(cache_dir, kind, key, suffix), key)


@contextmanager
def written_file(path: Path) -> Iterator[Path]:
    """Write the file ``path`` whole or not at all: the block writes the partial it is given."""
    partial = partial_path(path)
    try:
        yield partial
        partial.replace(path)
    except BaseException as error:
        partial.unlink(missing_ok=True)
        if is_disk_full(error):
            raise disk_full_error(path) from error
        raise


def write_table(table: pd.DataFrame, path: Path) -> None:
    """Write ``table`` as the parquet file ``path``, whole or not at all."""
    with written_file(path) as partial:
        table.to_parquet(partial, index=False)


def write_text(text: str, path: Path) -> None:
    """Write ``text`` to ``path``, whole or not at all."""
    with written_file(path) as partial:
        partial.write_text(text)


def allocated_memmap(path: Path, dtype, shape: tuple[int, ...]) -> np.memmap:
    """A new ``.npy`` file opened as a writable memory map, its blocks reserved on disk.

    ``open_memmap`` alone makes a sparse file: on a full disk the first write to an
    unbacked page kills the process with SIGBUS. Reserving every block first turns that
    into an OSError (ENOSPC) here, before anything is written.
    """
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    if hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as handle:
            try:
                os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
            except OSError as error:
                # A file system without fallocate keeps the sparse file (and the old risk).
                if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    del array
                    raise
    return array


# -- partials of killed runs ------------------------------------------------------------
# ``<name>.partial-<pid>`` (every writer here), and ``.<name>.<pid>.partial``: the PNGs a
# scan materialized before it wrote through ``written_file`` too, still found in old caches.
_SLACK = 2.0  # seconds
_PARTIAL_NAMES = (re.compile(r"\.partial-(\d+)$"), re.compile(r"^\..+\.(\d+)\.partial$"))


def _partial_pid(name: str) -> int | None:
    for pattern in _PARTIAL_NAMES:
        match = pattern.search(name)
        if match:
            return int(match.group(1))
    return None


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None when it is not running.

    Linux: from /proc; elsewhere only whether it runs (start unknown: 0)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # runs, under another user
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
    except (OSError, StopIteration, IndexError, ValueError):
        return 0.0


def _last_written(path: Path) -> float:
    """The newest modification time of ``path`` and, for a folder, of what is directly in it
    (files being filled change, the folder itself does not)."""
    times = [path.lstat().st_mtime]
    if path.is_dir() and not path.is_symlink():
        for entry in os.scandir(path):
            try:
                times.append(entry.stat(follow_symlinks=False).st_mtime)
            except FileNotFoundError:
                pass
    return max(times)


def is_stale_partial(path: Path) -> bool:
    """A partial output whose writer is gone.

    It was last written before this process started, and its process is not running or
    the process now holding that pid started after it was last written (the pid was
    reused). This process's own partials and those of running writers are never stale,
    nor those written since this process started (a writer on another machine sharing the
    cache folder, whose pid means nothing here, keeps its files fresh)."""
    pid = _partial_pid(path.name)
    if pid is None or pid == os.getpid():
        return False
    try:
        written = _last_written(path)
    except FileNotFoundError:
        return False
    # Start times from /proc are good to about a second (boot time in whole seconds):
    # two seconds of slack either way.
    if written >= (_process_start(os.getpid()) or time.time()) - _SLACK:
        return False
    started = _process_start(pid)
    return started is None or started > written + _SLACK


def remove_stale_partials(cache_dir: str | Path) -> list[Path]:
    """Remove the partial outputs of killed runs anywhere under ``cache_dir``; returns them."""
    removed: list[Path] = []
    root = Path(cache_dir)
    if not root.is_dir():
        return removed
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            if _partial_pid(name) is not None and is_stale_partial(path):
                _remove(path)
                removed.append(path)
        dirs[:] = [d for d in dirs if _partial_pid(d) is None]  # nothing to find inside
    return removed
