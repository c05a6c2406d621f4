"""Detectors, all behind the interface of ``base.Detector``; the registry names them for params."""

from .base import Detector, PatchSet
from .patchcore import PatchCore

METHODS: dict[str, type[Detector]] = {cls.name: cls for cls in (PatchCore,)}

__all__ = ["Detector", "PatchSet", "PatchCore", "METHODS"]
