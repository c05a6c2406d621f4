"""File helpers the layout readers share: listing images and folders, finding masks,
writing derived PNG files once, and running file work on a few threads."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np

from ..cache import written_file
from ..errors import DefectflowError
from ..images import IMAGE_SUFFIXES

T = TypeVar("T")
R = TypeVar("R")


def map_in_threads(function: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[function(item) for item in items]`` on a few threads.

    The work is decoding and hashing files, which OpenCV and hashlib do
    without holding the GIL. The first error is raised and the rest of the
    work is cancelled, so a bad mask fails a large scan quickly.
    """
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        return list(pool.map(function, items))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def image_files(
    folder: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES
) -> list[tuple[str, Path]]:
    """Image files of one folder as (name for the image id, path), sorted.

    The name is the file's stem, or its full name when two files share a stem
    (``a.png`` and ``a.jpg``), so image ids stay unique. Hidden files (macOS
    ``._*`` resource forks, ``.DS_Store``) are not images and are ignored.
    """
    files = sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in suffixes
    )
    stem_counts = Counter(path.stem for path in files)
    return [(path.stem if stem_counts[path.stem] == 1 else path.name, path) for path in files]


def subfolders(folder: Path) -> list[Path]:
    return sorted(
        path for path in folder.iterdir() if path.is_dir() and not path.name.startswith(".")
    )


def find_mask(stem: str, folders: list[Path], names: tuple[str, ...]) -> Path | None:
    """The first existing mask file ``folder / name.format(stem=stem)``, in the given order."""
    for folder in folders:
        for name in names:
            path = folder / name.format(stem=stem)
            if path.is_file():
                return path
    return None


def category_folders(root: Path, category: str | None, expected: str) -> list[tuple[str, Path]]:
    """(category name, folder) of one category folder (it holds ``train/``) or of a folder
    of category folders; ``category`` selects one of several, or names the single one."""
    if (root / "train").is_dir():  # one category folder
        return [(category or root.name, root)]
    found = [path for path in subfolders(root) if (path / "train").is_dir()]
    if not found:
        raise DefectflowError(f"no {expected} in this folder", root)
    if category is not None:
        selected = [path for path in found if path.name == category]
        if not selected:
            names = ", ".join(path.name for path in found)
            raise DefectflowError(
                f"category {category!r} not found; categories here: {names}", root
            )
        found = selected
    return [(path.name, path) for path in found]


def write_png_once(path: Path, image: np.ndarray) -> None:
    """Write ``image`` (gray or RGB) as PNG unless the file already holds these pixels.

    Pixels, not bytes, are compared: another OpenCV build may encode the same
    pixels differently, and rewriting would change the file's content hash.
    """
    # OpenCV reads and writes colour as BGR.
    pixels = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if path.is_file():
        existing = cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        if existing is not None and np.array_equal(existing, pixels):
            return
    ok, encoded = cv2.imencode(".png", pixels)
    if not ok:
        raise DefectflowError("cannot encode image as PNG", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Whole or not at all: an interrupted run never leaves a truncated PNG behind.
    with written_file(path) as partial:
        partial.write_bytes(encoded.tobytes())
