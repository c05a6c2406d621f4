"""The MLflow pyfunc wrappers of a served detector and a served SegAD fusion, and the pip
requirements they are logged with. All the scoring is ``serving.scorer``'s."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import mlflow
import pandas as pd


class DetectorPyfunc(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc of one fitted detector: ``predict(images)`` -> score, verdict, map per image.

    ``images``: a pandas DataFrame with a ``path`` column, a list of paths, or a list of
    RGB uint8 arrays (H, W, 3). The result is a DataFrame with one row per image:
    ``image``, ``score``, ``threshold``, ``verdict`` (``defective`` / ``good``) and
    ``anomaly_map`` (float32 (H, W) at the image's resolution). All the work is
    ``serving.scorer.ImageScorer``'s; this class only adapts it to MLflow.
    """

    def load_context(self, context) -> None:
        # The scorers load torch: resolving a model reference does not need it.
        from ..serving.scorer import ImageScorer

        self.scorer = ImageScorer.from_folder(context.artifacts["model"])

    # A DataFrame hint is one MLflow infers no schema from: inputs pass through unchanged,
    # so lists of paths or arrays work too.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return self.scorer.score(model_input)


class FusionPyfunc(DetectorPyfunc):
    """MLflow pyfunc of one category's SegAD fusion: the same inputs and output columns as
    ``DetectorPyfunc``; ``score`` is the served fusion's (``FusionConfig.model``: the forest's
    margin, the stacker's or one detector's score), ``anomaly_map`` the mean of the
    detectors' maps each normalized by its held-out goods. The work is
    ``serving.scorer.FusionScorer``'s."""

    def load_context(self, context) -> None:
        from ..serving.scorer import FusionScorer  # torch, as above

        self.scorer = FusionScorer.from_folder(context.artifacts["model"])


def pip_requirements() -> list[str]:
    """The served models' requirements: this package, at its installed version."""
    # Explicit, so MLflow does not spend time inferring them from the environment.
    try:
        return [f"defectflow=={version('defectflow')}"]
    except PackageNotFoundError:
        return ["defectflow"]
