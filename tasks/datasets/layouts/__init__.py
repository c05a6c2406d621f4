"""The dataset layouts: one reader module each, and the registry that lists them.

A layout reader is a ``find_candidates(root, options)`` function: it lists the
image files of its folder layout as :class:`~..candidates.Candidate` objects
(see each module's docstring for the layout). Adding a layout means adding
its module here and one line to ``REGISTRY``. The registry is the one list of
layout names: ``scan_dataset`` dispatches on it and the params validate
``dataset.layout`` against it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..candidates import Candidate, ScanOptions
from . import bsdata, elpv, folder, large, magnetic_tile, mvtec, mvtec_loco


@dataclass(frozen=True)
class Layout:
    """A layout's reader, and where its data comes from.

    A layout shipped inside a Python package (``elpv``) has no source folder:
    ``packaged_root`` gives the package's folder (what the scan's fingerprint covers) and
    the reader takes ``materialize_dir/<layout name>`` as its root.
    """

    find_candidates: Callable[[Path, ScanOptions], list[Candidate]]
    packaged_root: Callable[[], Path] | None = None

    @property
    def needs_source(self) -> bool:
        return self.packaged_root is None


# In this order in error messages; "elpv" (the default layout) first.
REGISTRY: dict[str, Layout] = {
    "elpv": Layout(elpv.find_candidates, packaged_root=elpv.package_root),
    "mvtec": Layout(mvtec.find_candidates),
    "mvtec_loco": Layout(mvtec_loco.find_candidates),
    "magnetic_tile": Layout(magnetic_tile.find_candidates),
    "folder": Layout(folder.find_candidates),
    "large": Layout(large.find_candidates),
    "bsdata": Layout(bsdata.find_candidates),
}

LAYOUTS = tuple(REGISTRY)  # the layout names
