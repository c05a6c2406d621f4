"""The fusion that chooses without test labels (``fusion.setting: auto``).

On its own training split only (held-out goods plus the seed's labelled or synthetic
defects), stratified k-fold cross-validation scores three kinds of candidate by the AUROC of
their out-of-fold scores:

- ``"forest"``: SegAD's boosted forest on the segment features;
- ``"stacker"``: logistic regression on the detectors' goods-standardized image scores;
- each detector alone (its own image score; nothing to fit, so its folds' AUROC is just
  its ranking of the held-out fold).

The stacker is kept unless the forest beats it by more than ``tolerance``. The detectors
alone are cross-validated too, for the record, but never chosen: with ~20 labelled
defects the training split's AUROC has a standard error of ~0.03, and picking the detector
that scores best on it measured worse than the stacker on all three data sets
(bench/fusion.py; on Magnetic Tile it picked PatchCore instead of PaDiM on some seeds),
while the regularized stacker, which leaves out detectors no better than chance, weighs
the strong detectors together and beat every detector alone. The chosen candidate is then refitted on the whole training split. Which one, and why, is recorded
per seed (``Choice``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..errors import DefectflowError
from .forest import fit_classifier, margin_scores
from .stacking import Stacker, fit_stacker

FOREST = "forest"
STACKER = "stacker"
DEFAULT_FOLDS = 5
# The forest replaces the stacker only when its cross-validated AUROC is this much higher.
# Measured (bench/fusion_table.py, 30 seeds over three data sets): at 0.02 the forest was chosen
# on 3 seeds and lost to the stacker on all three evaluation sets (by 0.009 to 0.05); on
# the two checked it had won the training split's CV by 0.046 and 0.057. On average over
# the seeds the paper forest scored 0.013-0.036 below the stacker. A segment-level signal that the image
# scores miss (tests/test_fusion.py) puts the forest far more than 0.1 ahead.
DEFAULT_TOLERANCE = 0.1


@dataclass(frozen=True)
class Choice:
    """Which fusion a seed uses, every candidate's cross-validated AUROC, and why."""

    chosen: str                         # "forest", "stacker" or a detector's name
    cv_auroc: Mapping[str, float] = field(default_factory=dict)
    reason: str = ""


@dataclass(frozen=True)
class FittedFusion:
    """The chosen candidate fitted on the whole training split."""

    choice: Choice
    forest_columns: tuple[str, ...] = ()
    forest: object | None = None        # XGBClassifier
    stacker: Stacker | None = None
    score_column: str | None = None     # a single detector's image score

    def score(self, frame: pd.DataFrame) -> np.ndarray:
        """Scores of ``frame``'s rows (higher = more defective)."""
        if self.forest is not None:
            return margin_scores(self.forest,
                                 frame.loc[:, list(self.forest_columns)].to_numpy(np.float32))
        if self.stacker is not None:
            return self.stacker.decision(frame)
        return frame[self.score_column].to_numpy(np.float64)


def _candidates(detector_columns: Mapping[str, str], forest_columns: Sequence[str], kind: str,
                seed: int, n_jobs: int) -> dict[str, Callable]:
    """name -> fit(frame, labels) -> FittedFusion."""
    def single(name: str, column: str):
        return lambda frame, y: FittedFusion(Choice(name), score_column=column)

    def stacker(frame, y):
        return FittedFusion(Choice(STACKER),
                            stacker=fit_stacker(frame, y, list(detector_columns.values())))

    def forest(frame, y):
        model = fit_classifier(frame.loc[:, list(forest_columns)].to_numpy(np.float32), y,
                               kind=kind, seed=seed, n_jobs=n_jobs)
        return FittedFusion(Choice(FOREST), forest_columns=tuple(forest_columns), forest=model)

    out = {name: single(name, column) for name, column in detector_columns.items()}
    if len(detector_columns) > 1:
        out[STACKER] = stacker
    out[FOREST] = forest
    return out


def cross_validated_auroc(frame: pd.DataFrame, labels: np.ndarray,
                          candidates: Mapping[str, Callable], seed: int,
                          folds: int = DEFAULT_FOLDS) -> dict[str, float]:
    """Each candidate's AUROC of its pooled out-of-fold scores, on the same stratified folds
    (seeded). Pooled rather than per fold: a fold holds ~4 defects, the pool all of them (a
    detector alone then gets exactly its training-split AUROC), and a candidate whose
    scale drifts between folds pays for it, as it would on new images."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels).astype(int)
    folds = min(int(folds), int(labels.sum()), int((labels == 0).sum()))
    if folds < 2:
        raise DefectflowError(f"the fusion's choice needs at least 2 good and 2 defective "
                              f"training images (got {int((labels == 0).sum())} good, "
                              f"{int(labels.sum())} defective)")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    pooled = {name: np.zeros(len(labels)) for name in candidates}
    for fit_rows, held_rows in splitter.split(np.zeros(len(labels)), labels):
        fit_part, held_part = frame.iloc[fit_rows], frame.iloc[held_rows]
        for name, fit in candidates.items():
            pooled[name][held_rows] = fit(fit_part, labels[fit_rows]).score(held_part)
    return {name: float(roc_auc_score(labels, scores)) for name, scores in pooled.items()}


def choose_and_fit(frame: pd.DataFrame, labels: np.ndarray, detector_columns: Mapping[str, str],
                   forest_columns: Sequence[str], kind: str = "brf", seed: int = 0,
                   n_jobs: int = 1, folds: int = DEFAULT_FOLDS,
                   tolerance: float = DEFAULT_TOLERANCE) -> FittedFusion:
    """Choose by cross-validation on ``frame`` (the training split only) and refit the choice.

    ``detector_columns``: detector name -> its image-score column; ``forest_columns``: the
    forest's features. The stacker is chosen unless the forest's cross-validated AUROC is
    more than ``tolerance`` higher.
    """
    labels = np.asarray(labels).astype(int)
    candidates = _candidates(detector_columns, forest_columns, kind, seed, n_jobs)
    cv = cross_validated_auroc(frame, labels, candidates, seed, folds)
    # The stacker unless the forest beats it by more than ``tolerance``; the detectors alone
    # are scored for the record only (see the module docstring).
    chosen = FOREST if STACKER not in cv or cv[FOREST] > cv[STACKER] + tolerance else STACKER
    ranked = ", ".join(f"{name} {value:.3f}" for name, value in
                       sorted(cv.items(), key=lambda item: -item[1]))
    rule = ("highest" if cv[chosen] >= max(cv.values())
            else f"the stacker unless the forest is {tolerance:g} higher in")
    reason = f"{chosen}: {rule} {folds}-fold CV AUROC on the training split: {ranked}"
    fitted = candidates[chosen](frame, labels)
    choice = Choice(chosen, {k: round(float(v), 6) for k, v in cv.items()}, reason)
    return FittedFusion(choice, fitted.forest_columns, fitted.forest, fitted.stacker,
                        fitted.score_column)
