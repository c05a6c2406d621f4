"""Self-contained model folders, what the registry logs: a detector's (``detector/`` and
``scoring.json``) and a SegAD fusion's (each fused detector's folder plus the fusion's forest,
segment map and settings)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import DefectflowError
from ..fusion.deploy import FOREST_NAME, FUSION_CONFIG_NAME, SEGMENTS_NAME, FusionConfig
from .config import CONFIG_NAME, ScoringConfig


def write_model_folder(folder: str | Path, detector_dir: str | Path,
                       config: ScoringConfig) -> Path:
    """Lay out a self-contained model folder: ``detector/`` (a copy) and ``scoring.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(detector_dir, folder / "detector", dirs_exist_ok=True)
    config.save(folder / CONFIG_NAME)
    return folder


def write_fusion_model_folder(folder: str | Path, fusion_dir: str | Path,
                              detectors: dict[str, tuple[str | Path, ScoringConfig]]) -> Path:
    """A self-contained fusion model folder: ``detectors/<method>/`` (``write_model_folder``
    of each fused detector: ``method -> (detector dir, scoring settings)``) and ``fusion/``
    (forest, segment map and fusion settings from the pipeline's fusion folder)."""
    folder = Path(folder)
    fusion_dir = Path(fusion_dir)
    config = FusionConfig.load(fusion_dir / FUSION_CONFIG_NAME)
    missing = sorted(set(config.detectors) - set(detectors))
    if missing:
        raise DefectflowError(f"the fusion needs detectors {missing} to be packed", fusion_dir)
    (folder / "fusion").mkdir(parents=True, exist_ok=True)
    for name in (FOREST_NAME, SEGMENTS_NAME, FUSION_CONFIG_NAME):
        if name != FOREST_NAME or (fusion_dir / name).is_file():  # no forest: stacker/detector
            shutil.copy2(fusion_dir / name, folder / "fusion" / name)
    for method in config.detectors:
        detector_dir, scoring = detectors[method]
        write_model_folder(folder / "detectors" / method, detector_dir, scoring)
    return folder
