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
    """A layout's reader, and whether it reads a source folder.

    A layout without one (``elpv``) reads ``materialize_dir/<layout name>`` as its root.
    """

    find_candidates: Callable[[Path, ScanOptions], list[Candidate]]
    needs_source: bool = True


# In this order in error messages; "elpv" (the default layout) first.
REGISTRY: dict[str, Layout] = {
    "elpv": Layout(elpv.find_candidates, needs_source=False),
    "mvtec": Layout(mvtec.find_candidates),
    "mvtec_loco": Layout(mvtec_loco.find_candidates),
    "magnetic_tile": Layout(magnetic_tile.find_candidates),
    "folder": Layout(folder.find_candidates),
    "large": Layout(large.find_candidates),
    "bsdata": Layout(bsdata.find_candidates),
}

LAYOUTS = tuple(REGISTRY)  # the layout names
