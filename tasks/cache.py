"""Content-addressed outputs on disk: ``Ref``, and the write-beside-then-rename idiom, once.

A step's output lives at ``<cache_dir>/<kind>/<key>[suffix]``. It is written under a
partial name beside that place (``<name>.partial-<pid>``) and renamed into it when
complete, so an interrupted step never leaves an output that looks finished, and two
processes making the same key never see each other's half-written files.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd


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


@contextmanager
def written_folder(final: Path, key: str = "") -> Iterator[FolderWrite]:
    """Make the folder ``final`` whole or not at all.

    When ``final`` exists, the block sees ``missing`` False and nothing happens. Otherwise
    ``partial`` is created empty, and when the block ends it is renamed to ``final``; if
    another process finished the same folder first, theirs is kept and ours dropped. A
    block that raises leaves nothing behind.
    """
    out = FolderWrite(final, partial_path(final), not final.exists(), key)
    if not out.missing:
        yield out
        return
    shutil.rmtree(out.partial, ignore_errors=True)
    out.partial.mkdir(parents=True)
    try:
        yield out
    except BaseException:
        shutil.rmtree(out.partial, ignore_errors=True)
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


def write_table(table: pd.DataFrame, path: Path) -> None:
    """Write ``table`` as the parquet file ``path``, whole or not at all."""
    partial = partial_path(path)
    table.to_parquet(partial, index=False)
    partial.replace(path)
