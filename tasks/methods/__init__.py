"""Detectors, all behind the interface of ``base.Detector``; the registry names them for params."""

from .base import Detector, PatchSet
from .classifier import FineTunedClassifier
from .cutpaste import CutPaste
from .ensemble import FeatureEnsemble
from .padim import PaDiM
from .patchcore import PatchCore

METHODS: dict[str, type[Detector]] = {
    cls.name: cls for cls in (PatchCore, PaDiM, CutPaste, FineTunedClassifier, FeatureEnsemble)
}

__all__ = ["Detector", "PatchSet", "PatchCore", "PaDiM", "CutPaste", "FineTunedClassifier",
           "FeatureEnsemble", "METHODS"]
