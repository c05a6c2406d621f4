"""The MLflow pyfunc wrappers of a served detector and a served SegAD fusion, and the pip
requirements they are logged with. All the scoring is ``serving.scorer``'s."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array

# What predict returns, one row per image. No input schema: MLflow would enforce it and
# refuse the lists of paths or arrays that predict also accepts (see DetectorPyfunc);
# the inputs are described in each version's description (``version_description``).
SIGNATURE = ModelSignature(inputs=None, outputs=Schema([
    ColSpec(DataType.string, "image"), ColSpec(DataType.double, "score"),
    ColSpec(DataType.double, "threshold"), ColSpec(DataType.string, "verdict"),
    ColSpec(Array(Array(DataType.float)), "anomaly_map")]))

INPUTS = ("a pandas DataFrame with a `path` column of image files, a list of paths, or a list "
          "of RGB uint8 arrays (H, W, 3)")
OUTPUTS = ("one row per image: `image`, `score`, `threshold`, `verdict` (`defective` if "
           "score >= threshold, else `good`), `anomaly_map` (float32 H x W)")


def version_description(what: str, metrics: dict, threshold: float) -> str:
    """A registered version's description: what it is, its test figures at its threshold,
    and how to call it."""
    def figure(name: str) -> str:
        value = metrics.get(name)
        return "-" if not isinstance(value, (int, float)) or value != value else f"{value:.4f}"

    return (f"{what}. Test image AUROC {figure('image_auroc')}; at its threshold "
            f"{threshold:.4g}: recall {figure('recall')}, escape rate {figure('escape_rate')}, "
            f"false-alarm rate {figure('false_alarm_rate')}.\n\nInput: {INPUTS}.\n"
            f"Output: {OUTPUTS}.")

from ..serving.config import B64_COLUMN


class DetectorPyfunc(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc of one fitted detector: ``predict(images)`` -> score, verdict, map per image.

    ``images``: a pandas DataFrame with a ``path`` column, a list of paths, or a list of
    RGB uint8 arrays (H, W, 3). The result is a DataFrame with one row per image:
    ``image``, ``score``, ``threshold``, ``verdict`` (``defective`` / ``good``) and
    ``anomaly_map`` (float32 (H, W) at the image's resolution). All the work is
    ``serving.scorer.ImageScorer``'s; this class only adapts it to MLflow.

    Over REST (``mlflow models serve``) the rows carry the image files' bytes,
    base64-encoded, in an ``image_b64`` column (optional ``name``, ``with_map``): the
    answer is ``image``, ``score``, ``threshold``, ``verdict``, and ``anomaly_map`` as
    nested lists only when a row asks ``with_map: true`` (maps are large in JSON).
    """

    def load_context(self, context) -> None:
        # The scorers load torch: resolving a model reference does not need it.
        from ..serving.scorer import ImageScorer

        self.scorer = ImageScorer.from_folder(context.artifacts["model"])

    # A DataFrame hint is one MLflow infers no schema from: inputs pass through unchanged,
    # so lists of paths or arrays work too.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        result = self.scorer.score(model_input)
        if isinstance(model_input, pd.DataFrame) and B64_COLUMN in model_input.columns:
            return rest_answer(result, model_input)
        return result


def rest_answer(result: pd.DataFrame, request: pd.DataFrame) -> pd.DataFrame:
    """The JSON-able answer to base64 rows: the map only where a row asked ``with_map``."""
    wanted = (request["with_map"].fillna(False).astype(bool).to_numpy()
              if "with_map" in request.columns else np.zeros(len(request), bool))
    answer = result.drop(columns=["anomaly_map"])
    if wanted.any():
        answer["anomaly_map"] = [np.round(m, 6).tolist() if w else None
                                 for m, w in zip(result["anomaly_map"], wanted)]
    return answer


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
