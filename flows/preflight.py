"""Checks of a run's params and environment before any work starts (``defectflow run``/``serve``
and every scheduled run): the backbone has the layers asked for, the device exists, the data
source is there, the cache folder is writable with free space, and the tracking store is
reachable, writable and has its tables. Each failure is one ``DefectflowError`` naming the
setting (the params file or the ``--set`` override) or the folder/store; nothing is computed.
"""

from __future__ import annotations

from ..tasks.backbones import available_layers
from ..tasks.datasets import REGISTRY
from ..tasks.errors import DefectflowError
from ..tasks.params import ParamsOrigin, PipelineParams
from ..tasks.steps import source_fingerprint
from ..tasks.storage import writable_folder


def preflight(params: PipelineParams, origin: ParamsOrigin | None = None) -> None:
    """Check what can be checked before any work starts; ``origin`` names the settings."""
    origin = origin or ParamsOrigin()
    features = params.features
    try:
        layers = available_layers(features.backbone)
    except DefectflowError as exc:
        from ..tasks.methods.cutpaste_encoder import ENCODER_SOURCE

        hint = (f" ({ENCODER_SOURCE}'s encoder is a source of a feature ensemble: list it "
                "under features.sources)" if features.backbone == ENCODER_SOURCE else "")
        raise DefectflowError(f"features.backbone: {exc}{hint}", origin.of("features.backbone")
                              ) from None
    unknown = [layer for layer in features.layers if layer not in layers]
    if unknown:
        raise DefectflowError(f"features.layers: unknown layer(s) {unknown} for backbone "
                              f"{features.backbone!r} (valid: {layers})",
                              origin.of("features.layers"))
    check_device(features.device, origin.of("features.device"))
    if features.combined:
        from ..tasks.feature_sources import check_sources
        from ..tasks.methods.cutpaste_encoder import encoder_params

        check_sources(features, origin.of("features.sources"),
                      cutpaste=encoder_params(features, params.methods))
    if REGISTRY[params.dataset.layout].needs_source:
        source_fingerprint(params.dataset.layout, params.dataset.path)
    writable_folder(params.cache_dir, "cache_dir", params.min_free_gb)
    from ..tasks.tracking.store import check_store, prepare_store

    uri = params.tracking.resolved_uri()
    check_store(uri, create=True, min_free_gb=params.min_free_gb)
    prepare_store(uri)


def check_device(device: str, where: str) -> None:
    """A ``cuda`` device must exist now: asked for and missing, features would fail mid-run
    (or, with every feature cached, never be noticed)."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise DefectflowError(f"features.device {device!r}: torch sees no CUDA device "
                              "(use auto or cpu)", where)
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise DefectflowError(f"features.device {device!r}: only "
                              f"{torch.cuda.device_count()} CUDA device(s)", where)
