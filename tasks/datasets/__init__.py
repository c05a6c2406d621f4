"""Datasets: scanning a folder layout into a manifest, and describing what it holds.

``manifest.py`` scans (``scan_dataset``) and splits; ``layouts/`` holds one
reader per folder layout and the registry of layout names; ``properties.py``
clusters images by brightness, colourfulness and edge density.
"""

from .candidates import GOOD
from .layouts import LAYOUTS, REGISTRY
from .manifest import (
    MANIFEST_COLUMNS,
    ScanResult,
    count_table,
    holdout_validation,
    scan_dataset,
)
from .properties import image_properties, property_table

__all__ = [
    "GOOD",
    "LAYOUTS",
    "REGISTRY",
    "MANIFEST_COLUMNS",
    "ScanResult",
    "count_table",
    "holdout_validation",
    "image_properties",
    "property_table",
    "scan_dataset",
]
