"""Serving registered models on new images.

- ``config``: a detector's scoring settings (``ScoringConfig``, ``scoring.json``), made from
  a pipeline result;
- ``model_folder``: the self-contained folders the registry logs (detector, fusion);
- ``scorer``: ``ImageScorer`` and ``FusionScorer``, which score images with such a folder
  (they load torch, so they are not imported here: import ``serving.scorer``);
- ``inbox``: scoring an inbox folder of new images, every image once, none lost.

Plain Python: the MLflow pyfunc wrappers live in ``tracking.pyfunc``.
"""

from .config import CONFIG_NAME, ScoringConfig, config_from_pipeline, overlay_scale
from .model_folder import write_fusion_model_folder, write_model_folder

__all__ = ["CONFIG_NAME", "ScoringConfig", "config_from_pipeline", "overlay_scale",
           "write_model_folder", "write_fusion_model_folder"]
