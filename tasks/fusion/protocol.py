"""Which images train and which evaluate the fusion (SegAD's supervised protocol over
seeds, or one-class with synthetic defects), and the per-seed fit-and-evaluate loop."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..errors import DefectflowError
from .choice import DEFAULT_FOLDS, DEFAULT_TOLERANCE, FOREST, Choice, FittedFusion, choose_and_fit
from .forest import fit_classifier


@dataclass(frozen=True)
class FusionSplit:
    """Which images train the fusion and which evaluate it, for one seed."""

    train_ids: tuple[str, ...]
    eval_ids: tuple[str, ...]
    seed: int


def supervised_splits(image_ids: Sequence[str], labels: Sequence[int], splits: Sequence[str],
                      n_defective: int = 20, seeds: Iterable[int] = range(10)
                      ) -> list[FusionSplit]:
    """SegAD's supervised protocol, one split per seed.

    Train: every "val" image (good training images held out of the
    detectors' fit) plus ``n_defective`` defective "test" images drawn with
    the seed. At most half of the defective test images are drawn, so that
    some remain to evaluate on; the draw is the same as
    ``steps.labelled_defects`` (sorted ids, ``default_rng(seed).choice``).
    Eval: the rest of the test split. "train" images (the detectors fitted
    on them, their maps are optimistic) are never used.

    Pass only images that have anomaly maps from every detector.
    """
    ids = np.asarray(list(image_ids), dtype=object)
    labels = np.asarray(list(labels))
    splits = np.asarray(list(splits), dtype=object)
    if not len(ids) == len(labels) == len(splits):
        raise DefectflowError(f"{len(ids)} image ids, {len(labels)} labels and {len(splits)} "
                              "splits: expected one of each per image")
    if len(set(ids.tolist())) != len(ids):
        raise DefectflowError("image ids are not unique")
    val = splits == "val"
    test = splits == "test"
    if not val.any():
        raise DefectflowError("no held-out good ('val') images to train the fusion on "
                              "(set dataset.validation_fraction > 0)")
    if (labels[val] != 0).any():
        raise DefectflowError(f"'val' images must be good; defective: "
                              f"{sorted(ids[val & (labels != 0)].tolist())[:5]}")
    defective = np.sort(ids[test & (labels == 1)].astype(str))
    count = min(int(n_defective), len(defective) // 2)
    if count < 1:
        raise DefectflowError(f"the supervised fusion needs at least 2 defective test images "
                              f"(found {len(defective)}) and n_defective >= 1 "
                              f"(got {n_defective})")
    goods = tuple(sorted(ids[val].astype(str).tolist()))
    test_ids = sorted(ids[test].astype(str).tolist())
    result = []
    for seed in seeds:
        drawn = set(np.random.default_rng(seed).choice(defective, size=count, replace=False)
                    .tolist())
        result.append(FusionSplit(train_ids=goods + tuple(sorted(drawn)),
                                  eval_ids=tuple(i for i in test_ids if i not in drawn),
                                  seed=int(seed)))
    return result


def one_class_split(image_ids: Sequence[str], splits: Sequence[str],
                    synthetic_ids: Sequence[str], seed: int = 0) -> FusionSplit:
    """One-class mode (appendix A.2): train on the "val" goods (label 0) and synthetic
    defects made from held-out good images (label 1); evaluate on the whole test split.

    ``synthetic_ids`` name the rows of the synthetic images in the feature
    table (give them label 1 in the labels passed to ``fit_and_score``).
    """
    ids = list(image_ids)
    splits = list(splits)
    if len(ids) != len(splits):
        raise DefectflowError(f"{len(ids)} image ids for {len(splits)} splits")
    goods = sorted(i for i, s in zip(ids, splits) if s == "val")
    tests = sorted(i for i, s in zip(ids, splits) if s == "test")
    if not goods or not synthetic_ids:
        raise DefectflowError("one-class fusion needs 'val' good images and synthetic defects "
                              f"(got {len(goods)} and {len(synthetic_ids)})")
    split = FusionSplit(tuple(goods) + tuple(sorted(synthetic_ids)), tuple(tests), int(seed))
    assert_no_leakage([split])
    return split


def assert_no_leakage(splits: Iterable[FusionSplit]) -> None:
    """Raise if any split evaluates an image it trained on."""
    for split in splits:
        leaked = set(split.train_ids) & set(split.eval_ids)
        if leaked:
            raise DefectflowError(f"fusion split (seed {split.seed}) evaluates {len(leaked)} "
                                  f"images it trained on, e.g. {sorted(leaked)[:5]}")


def fit_and_score(features: pd.DataFrame, labels: Mapping[str, int] | pd.Series,
                  split: FusionSplit, kind: str = "brf", n_jobs: int = 2) -> pd.Series:
    """SegAD's forest (the paper setting) fitted on ``split.train_ids``, scoring
    ``split.eval_ids`` (raw margins) from every column of ``features``.

    ``features``: indexed by image id (``feature_frame``); ``labels``: image
    id -> 0/1. The classifier's seed is the split's seed.
    """
    fitted = fit_fusion(features, labels, split, kind=kind, n_jobs=n_jobs)
    return _score(fitted, features, split)


def fit_fusion(features: pd.DataFrame, labels: Mapping[str, int] | pd.Series,
               split: FusionSplit, kind: str = "brf", n_jobs: int = 2,
               setting: str = "paper", choice: ChoiceSettings | None = None) -> FittedFusion:
    """The fusion of one split, fitted on ``split.train_ids`` only.

    ``setting``: ``"paper"``, SegAD's forest on every column of ``features``; ``"auto"``,
    ``choice.choose_and_fit`` on the training split (``choice`` names the detectors'
    image-score columns and the forest's columns).
    """
    labels = pd.Series(labels)
    _require_ids(features.index, split.train_ids + split.eval_ids, "feature table")
    _require_ids(labels.index, split.train_ids, "labels")
    train = list(split.train_ids)
    y = labels.loc[train].to_numpy()
    if setting == "auto":
        if choice is None:
            raise DefectflowError("the auto fusion setting needs the detectors' score columns")
        return choose_and_fit(features.loc[train], y, dict(choice.detector_columns),
                              list(choice.forest_columns), kind=kind, seed=split.seed,
                              n_jobs=n_jobs, folds=choice.folds, tolerance=choice.tolerance)
    if setting != "paper":
        raise DefectflowError(f"unknown fusion setting {setting!r} (use 'paper' or 'auto')")
    columns = [c for c in features.columns if choice is None or c in choice.forest_columns]
    model = fit_classifier(features.loc[train, columns].to_numpy(np.float32), y, kind=kind,
                           seed=split.seed, n_jobs=n_jobs)
    return FittedFusion(Choice(FOREST, reason="paper setting: SegAD's forest"),
                        forest_columns=tuple(columns), forest=model)


def _score(fitted: FittedFusion, features: pd.DataFrame, split: FusionSplit) -> pd.Series:
    scores = fitted.score(features.loc[list(split.eval_ids)])
    return pd.Series(scores, index=pd.Index(split.eval_ids, name="image_id"), name="score")


@dataclass(frozen=True)
class ChoiceSettings:
    """What the auto setting chooses from: detector name -> its image-score column, the
    forest's feature columns, the folds of its cross-validation and its tolerance."""

    detector_columns: tuple[tuple[str, str], ...]
    forest_columns: tuple[str, ...]
    folds: int = DEFAULT_FOLDS
    tolerance: float = DEFAULT_TOLERANCE


@dataclass
class ProtocolResult:
    """Per-seed metrics, every seed's evaluation scores, and their summary over seeds."""

    per_seed: pd.DataFrame   # seed, image_auroc, image_aupr, n_train_good, n_train_bad, n_eval
    scores: pd.DataFrame     # seed, image_id, label, score
    fitted: list[FittedFusion] = field(default_factory=list)  # per split, in order

    @property
    def summary(self) -> dict[str, float]:
        """Mean and standard deviation (ddof=1; NaN for one seed) of each metric column."""
        metrics = [c for c in self.per_seed.columns
                   if c not in ("seed", "n_train_good", "n_train_bad", "n_eval")
                   and pd.api.types.is_numeric_dtype(self.per_seed[c])]
        out = {}
        for column in metrics:
            values = self.per_seed[column].astype(float)
            out[f"{column}_mean"] = float(values.mean())
            out[f"{column}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        return out


def run_protocol(features: pd.DataFrame, labels: Mapping[str, int] | pd.Series,
                 splits: Sequence[FusionSplit], kind: str = "brf",
                 baselines: Sequence[str] = (), n_jobs: int = 2, setting: str = "paper",
                 choice: ChoiceSettings | None = None) -> ProtocolResult:
    """Fit and evaluate the fusion once per split (seed) (``fit_fusion``: ``setting`` and
    ``choice``). The per-seed table says which fusion each seed used (``choice``) and why.

    ``baselines``: feature columns (e.g. ``"patchcore.image_score"``) whose raw
    values are evaluated on the same images, as ``"<column>_auroc"`` and
    ``"<column>_aupr"`` columns: the comparison SegAD reports.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    splits = list(splits)
    if not splits:
        raise DefectflowError("no fusion splits to run")
    assert_no_leakage(splits)
    missing = [c for c in baselines if c not in features.columns]
    if missing:
        raise DefectflowError(f"baseline columns {missing} are not in the feature table")
    labels = pd.Series(labels)

    def metrics(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
        if y.min() == y.max():  # one class only: the ranking metrics are undefined
            return float("nan"), float("nan")
        return float(roc_auc_score(y, s)), float(average_precision_score(y, s))

    rows, score_tables, fitted_all = [], [], []
    for split in splits:
        fitted = fit_fusion(features, labels, split, kind=kind, n_jobs=n_jobs,
                            setting=setting, choice=choice)
        scores = _score(fitted, features, split)
        _require_ids(labels.index, split.eval_ids, "labels")
        y_eval = labels.loc[list(split.eval_ids)].to_numpy().astype(int)
        y_train = labels.loc[list(split.train_ids)].to_numpy().astype(int)
        auroc, aupr = metrics(y_eval, scores.to_numpy())
        row = dict(seed=split.seed, image_auroc=auroc, image_aupr=aupr,
                   n_train_good=int((y_train == 0).sum()), n_train_bad=int((y_train == 1).sum()),
                   n_eval=len(split.eval_ids))
        for column in baselines:
            base = features.loc[list(split.eval_ids), column].to_numpy(np.float64)
            row[f"{column}_auroc"], row[f"{column}_aupr"] = metrics(y_eval, base)
        row["choice"], row["choice_reason"] = fitted.choice.chosen, fitted.choice.reason
        rows.append(row)
        fitted_all.append(fitted)
        score_tables.append(pd.DataFrame({"seed": split.seed, "image_id": list(split.eval_ids),
                                          "label": y_eval, "score": scores.to_numpy()}))
    return ProtocolResult(pd.DataFrame(rows), pd.concat(score_tables, ignore_index=True),
                          fitted_all)


def _require_ids(index: pd.Index, ids: Sequence[str], what: str) -> None:
    missing = pd.Index(list(ids)).difference(index)
    if len(missing):
        raise DefectflowError(f"{what} lacks {len(missing)} image ids of the fusion split, "
                              f"e.g. {sorted(missing.tolist())[:5]}")
