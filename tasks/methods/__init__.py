"""Detectors, all behind the interface of ``base.Detector``; the registry names them for params."""

import ast
import hashlib
import inspect
from functools import lru_cache
from pathlib import Path

from .base import Detector, FeatureDetector, PatchSet
from .classifier import FineTunedClassifier
from .cutpaste import CutPaste
from .ensemble import FeatureEnsemble
from .msflow import MSFlow
from .padim import PaDiM
from .patchcore import PatchCore

METHODS: dict[str, type[Detector]] = {
    cls.name: cls for cls in (PatchCore, PaDiM, CutPaste, FineTunedClassifier, FeatureEnsemble,
                               MSFlow)
}


def source_hash(method: str) -> str:
    """SHA-256 of the source of ``method``'s module and of every project module it
    imports, directly or through others (relative imports, also those inside functions).

    Part of the trained model's cache key: a change to, say, the coreset
    selection retrains PatchCore on the next run, and leaves PaDiM's cached
    models alone.
    """
    digest = hashlib.sha256()
    for name, source in _closure(_module_file(method)):
        digest.update(name.encode() + b"\x00" + source + b"\x00")
    return digest.hexdigest()


def source_files(method: str) -> list[str]:
    """The files :func:`source_hash` covers, relative to the package folder."""
    return [name for name, _ in _closure(_module_file(method))]


def _module_file(method: str) -> Path:
    return Path(inspect.getsourcefile(METHODS[method])).resolve()


@lru_cache(maxsize=None)
def _closure(start: Path) -> tuple[tuple[str, bytes], ...]:
    """(path relative to the package folder, source) of ``start`` and its project imports."""
    seen: dict[Path, bytes] = {}
    pending = [start]
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen[path] = source = path.read_bytes()
        for node in ast.walk(ast.parse(source, filename=str(path))):
            if not (isinstance(node, ast.ImportFrom) and node.level > 0):
                continue
            base = path.parent
            for _ in range(node.level - 1):
                base = base.parent
            targets = [node.module] if node.module else [alias.name for alias in node.names]
            for target in targets:
                stem = base.joinpath(*target.split("."))
                for candidate in (stem.with_suffix(".py"), stem / "__init__.py"):
                    if candidate.is_file():
                        pending.append(candidate.resolve())
                        break
    root = start.parents[1]  # the package folder (tasks/), wherever it is installed
    return tuple(sorted((str(path.relative_to(root)), source) for path, source in seen.items()))


__all__ = ["Detector", "FeatureDetector", "PatchSet", "PatchCore", "PaDiM", "CutPaste",
           "FineTunedClassifier",
           "FeatureEnsemble", "MSFlow", "METHODS", "source_hash"]
