"""Checks of a run's params before any work starts (``defectflow run``/``serve`` and every
scheduled run): the data source is there and the backbone has the layers asked for."""

from __future__ import annotations

from ..tasks.backbones import available_layers
from ..tasks.datasets import REGISTRY
from ..tasks.errors import DefectflowError
from ..tasks.params import PipelineParams
from ..tasks.steps import source_fingerprint


def preflight(params: PipelineParams) -> None:
    """Check what can be checked before any work starts: data path, backbone and layers."""
    layers = available_layers(params.features.backbone)  # raises for an unknown backbone
    unknown = [layer for layer in params.features.layers if layer not in layers]
    if unknown:
        raise DefectflowError(f"unknown layer(s) {unknown} for backbone "
                              f"{params.features.backbone!r} (valid: {layers})")
    if REGISTRY[params.dataset.layout].needs_source:
        source_fingerprint(params.dataset.layout, params.dataset.path)
