"""What the pipeline hands on: one typed result per (category, method), per category's fusion
and per category's plots (the flow to tracking), and the summary of a tracked run (tracking
to the CLI). Plain data: this module imports nothing from the project at run time."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only
    from .features import FeatureStoreRef
    from .steps import Ref


def scope(category: str, method: str | None = None) -> str:
    """The bracket a step's label ends with: ``[category / method]`` or ``[category]``. The
    flow names its steps so, and tracking finds a run's steps (and their times) by it."""
    return f"[{category} / {method}]" if method else f"[{category}]"


@dataclass(frozen=True)
class DetectorResult:
    """One (category, method) of a pipeline run: its settings and the steps' outputs."""

    category: str
    method: str
    method_params: Any       # the method's parameter object (``PipelineParams.methods``)
    normalization: dict      # mean, std and denoise the detector's input was made with
    model: Ref               # fitted detector folder
    evaluation: Ref          # metrics.json, roc.png, scores.csv, overlays/
    features: FeatureStoreRef
    scores: Ref              # image scores and anomaly maps


@dataclass(frozen=True)
class FusionResult:
    """One category's SegAD fusion folder (``steps.fusion_step``)."""

    category: str
    fusion: Ref


@dataclass(frozen=True)
class CategoryPlots:
    """One category's comparison figures (``steps.plots_step``)."""

    category: str
    plots: Ref


@dataclass(frozen=True)
class ComparisonRow:
    """One tracked child run in the run's comparison: its metrics by name."""

    category: str
    method: str
    run_id: str
    metrics: Mapping[str, float | None]

    def row(self) -> dict:
        """The row of ``comparison.csv``: category, method, then the metrics."""
        return {"category": self.category, "method": self.method, **self.metrics}


@dataclass(frozen=True)
class RegisteredModel:
    """A registered model version of a run, and the version each alias points at (None:
    no version has the registry's metric, the alias was not set)."""

    name: str
    version: str
    category: str
    method: str
    aliases: Mapping[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class PipelineSummary:
    """What ``tracking.record_pipeline`` logged: the MLflow run and the comparison rows."""

    experiment: str
    experiment_id: str
    parent_run_id: str
    all_steps_cached: bool
    results: tuple[ComparisonRow, ...]
    total_seconds: float
    registered: tuple[RegisteredModel, ...] = ()  # params.registry.enabled
    ui_hint: str = ""  # how to open the MLflow UI's comparison of this store
