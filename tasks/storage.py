"""Folders checked before any work starts: they can be created, written, and have free space.

A check writes and removes one small probe file instead of trusting permission bits: a root
user passes ``os.access`` on a read-only mount, and only a real write shows it.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from .errors import DefectflowError

GIB = 1024 ** 3


def os_problem(exc: OSError) -> str:
    """An OSError's reason in a few words ("Read-only file system"), without its file name."""
    return exc.strerror or errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def writable_folder(path: str | Path, setting: str, min_free_gb: float = 0.0) -> Path:
    """Create folder ``path`` if needed and prove it writable, with ``min_free_gb`` GiB free.

    ``setting`` names where the folder comes from (``cache_dir``, ``--out``): every failure is
    one ``DefectflowError`` naming the setting, the folder and the problem.
    """
    folder = Path(path).expanduser()
    where = f"{setting} {folder}"
    if folder.exists() and not folder.is_dir():
        raise DefectflowError(f"{where}: is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DefectflowError(f"{where}: cannot be created ({os_problem(exc)})") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".defectflow-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise DefectflowError(f"{where}: not writable ({os_problem(exc)})") from None
    if min_free_gb > 0:
        free = shutil.disk_usage(folder).free
        if free < min_free_gb * GIB:
            raise DefectflowError(f"{where}: {free / GIB:.2f} GiB free, {min_free_gb:g} GiB "
                                  "needed (min_free_gb)")
    return folder
