"""Pipeline parameters: YAML validated by a typed model; unknown keys and bad values are errors."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_serializer,
                      field_validator)
from pydantic import ValidationInfo

from .datasets import LAYOUTS
from .errors import DefectflowError
from .feature_settings import FeatureSettings
from .images import MAX_IMAGE_PIXELS, OPENCV_MAX_IMAGE_PIXELS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetParams(_Strict):
    # The layout registry's names: Literal[("a", "b")] means Literal["a", "b"].
    layout: Literal[LAYOUTS] = "elpv"  # type: ignore[valid-type]
    path: str | None = None            # folder of the data (not used by elpv)
    name: str | None = None            # dataset name: the MLflow experiment; default from layout
    category: str | None = None        # category name for single-category layouts
    categories: list[str] | None = None  # run only these categories
    train_fraction: float = Field(0.8, gt=0, lt=1)
    validation_fraction: float = Field(0.1, ge=0, lt=1)
    seed: int = 0
    # Larger images (from their header) are skipped undecoded; OpenCV's own cap is 2**30.
    max_image_pixels: int = Field(MAX_IMAGE_PIXELS, gt=0, le=OPENCV_MAX_IMAGE_PIXELS)

    @field_validator("category")
    @classmethod
    def _one_folder_name(cls, category):
        # A category names folders of the cache and of MLflow's artifacts.
        if category is not None and (category in ("", ".", "..") or "/" in category
                                     or "\\" in category):
            raise ValueError(f"{category!r} is not a usable category name (no path "
                             "separators, not '.' or '..')")
        return category


class PatchParams(_Strict):
    size: int | None = Field(None, gt=0)    # None: each whole image is one patch
    stride: int | None = Field(None, gt=0)  # None: equal to size
    min_mean_intensity: float = Field(31.0, ge=0, le=255)


class DenoiseParams(_Strict):
    """OpenCV fastNlMeansDenoisingColored, applied to each image before patches are cut."""

    h: float = Field(10.0, gt=0)
    template_window: int = Field(7, ge=1)
    search_window: int = Field(21, ge=1)

    @field_validator("template_window", "search_window")
    @classmethod
    def _odd(cls, value):
        if value % 2 == 0:
            raise ValueError("must be odd")
        return value


class PreprocessingParams(_Strict):
    denoise: DenoiseParams | None = None


class EvaluationParams(_Strict):
    threshold_quantile: float = Field(0.99, gt=0, le=1)
    overlays: int = Field(6, ge=0)
    plots: bool = True  # per category: ROC/PR of all methods, per-defect-type bars, t-SNE
    tsne_points: int = Field(300, ge=0)  # images in the t-SNE plot (seeded sample); 0: none


#: The method name of the SegAD fusion's runs, registered models and comparison rows.
FUSION_METHOD = "segad_fusion"


class FusionParams(_Strict):
    """SegAD fusion of the detectors' anomaly maps (needs two or more methods)."""

    enabled: bool = True
    # auto (default): per seed, cross-validation on the fusion's own training split chooses
    # between SegAD's forest (segment features + the detectors' own image scores), a
    # logistic-regression stacker of the detectors' image scores and the best detector alone;
    # paper: SegAD's appendix A.1 forest on the segment features and map maxima, as published.
    setting: Literal["auto", "paper"] = "auto"
    cv_folds: int = Field(5, ge=2)  # auto: stratified folds of the choice's cross-validation
    # supervised: trains on a few labelled defective test images (SegAD's protocol);
    # one_class: on synthetic defects pasted on held-out good images (appendix A.2).
    mode: Literal["supervised", "one_class"] = "supervised"
    synthetic_per_image: int = Field(1, ge=1)  # one_class: defects per held-out image, seed
    segmentation: Literal["grid", "superpixels"] = "grid"
    segments: int = Field(16, ge=1, le=1024)   # K
    classifier: Literal["brf", "rf", "bt"] = "brf"  # SegAD appendix A.1 and its ablations
    n_defective: int = Field(20, ge=1)  # labelled defective test images per seed
    seeds: int = Field(10, ge=1)
    seed: int = 0
    n_jobs: int = Field(1, ge=1)  # XGBoost threads; 1 avoided spin-waiting on a busy 2-core CPU


class CategorizationParams(_Strict):
    n_clusters: int | None = Field(None, ge=1)
    max_side: int = Field(256, ge=16)


DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class TrackingParams(_Strict):
    # None: MLFLOW_TRACKING_URI from the environment, else sqlite:///mlflow.db (see resolved_uri).
    uri: str | None = None
    experiment: str | None = None

    def resolved_uri(self) -> str:
        """The MLflow tracking URI: params > MLFLOW_TRACKING_URI > sqlite:///mlflow.db."""
        return self.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


class ExecutionParams(_Strict):
    """Where the flow's tasks run (per-category and per-method steps run concurrently).

    thread: a thread pool in the flow's process, ``max_workers`` steps at a time. On a
    2-core machine 2 is enough: torch already uses every core inside one step, and the
    flow divides the cores among the torch-heavy steps running at each moment (a step
    running alone gets all of them).
    dask: prefect-dask's DaskTaskRunner; ``dask_address`` of a running scheduler, or None
    for a LocalCluster of ``dask_n_workers`` x ``dask_threads_per_worker``.
    """

    task_runner: Literal["thread", "dask"] = "thread"
    max_workers: int = Field(2, ge=1)
    dask_address: str | None = None
    dask_n_workers: int = Field(2, ge=1)
    dask_threads_per_worker: int = Field(1, ge=1)
    dask_processes: bool = True  # LocalCluster: worker processes (False: threads, one process)


class RegistryParams(_Strict):
    """MLflow model registry: each detector becomes a version of
    ``<name_prefix>-<dataset>-<category>-<method>``; the version whose child run has the best
    ``metric`` gets ``alias``. The validation split holds only good images, so no label-based
    validation metric exists: the default ranks by the test image AUROC of metrics.json."""

    enabled: bool = False
    name_prefix: str = Field("defectflow", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    alias: str = Field("champion", pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")
    metric: str = "image_auroc"       # any key of metrics.json (a child run's metrics)
    greater_is_better: bool = True

    @field_validator("alias")
    @classmethod
    def _not_reserved(cls, alias):
        # MLflow reserves "latest" and version-like aliases ("v3").
        if alias.lower() == "latest" or (alias[0] in "vV" and alias[1:].isdigit()):
            raise ValueError(f"alias {alias!r} is reserved by MLflow")
        return alias


class PipelineParams(_Strict):
    dataset: DatasetParams = DatasetParams()
    patches: PatchParams = PatchParams()
    preprocessing: PreprocessingParams = PreprocessingParams()
    normalization: Literal["dataset", "imagenet"] = "dataset"
    features: FeatureSettings = FeatureSettings()
    # YAML options in, each method's typed parameter object out (``method_params``): the object
    # the validator builds here is the one the method's detector receives.
    methods: dict[str, Any] = Field(default={"patchcore": {}}, validate_default=True)
    evaluation: EvaluationParams = EvaluationParams()
    fusion: FusionParams = FusionParams()
    categorization: CategorizationParams = CategorizationParams()
    tracking: TrackingParams = TrackingParams()
    execution: ExecutionParams = ExecutionParams()
    registry: RegistryParams = RegistryParams()
    cache_dir: str = ".defectflow-cache"
    # Free space (GiB) the cache folder and a SQLite store's folder need before a run starts
    # (checked by flows/preflight.py); 0 turns the check off.
    min_free_gb: float = Field(1.0, ge=0)

    @field_validator("methods")
    @classmethod
    def _typed_methods(cls, methods, info: ValidationInfo):
        """Each method's options become its parameter object, once, with the feature layers
        (``features`` is validated before ``methods``)."""
        from .methods import METHODS

        if not methods:
            raise ValueError("at least one method is needed")
        features = info.data.get("features")
        layers = features.detector_layers if features is not None else None
        typed = {}
        for name, options in methods.items():
            if name not in METHODS:
                raise ValueError(f"unknown method {name!r} (choose from {sorted(METHODS)})")
            if isinstance(options, METHODS[name].Params):
                typed[name] = options
            elif options is None or isinstance(options, dict):
                typed[name] = method_params(name, options or {}, layers)
            else:
                raise ValueError(f"{name}: expected a mapping of options")
        return typed

    @field_serializer("methods")
    def _methods_as_options(self, methods: dict[str, Any]) -> dict[str, dict]:
        # Every resolved option, as YAML would give it; the layers come from ``features``.
        return {name: {k: list(v) if isinstance(v, tuple) else v
                       for k, v in dataclasses.asdict(params).items() if k != "layers"}
                for name, params in methods.items()}

    @property
    def dataset_name(self) -> str:
        return self.dataset.name or self.dataset.layout.replace("_", "-")


def method_params(name: str, options: dict[str, Any], layers: list[str] | None):
    """The method's parameter dataclass from YAML options; ``layers`` come from ``features``."""
    from .methods import METHODS

    params_cls = METHODS[name].Params
    fields = {f.name for f in dataclasses.fields(params_cls)} - {"layers"}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} for method {name!r} (valid: {sorted(fields)})")
    values = dict(options)
    if layers is not None and "layers" in {f.name for f in dataclasses.fields(params_cls)}:
        values["layers"] = tuple(layers)
    try:
        return TypeAdapter(params_cls).validate_python(values)
    except ValidationError as exc:
        raise ValueError(_first_error(exc)) from None


def error_message(err: dict) -> str:
    """pydantic's message without its "Value error, " prefix (nested validation repeats it)."""
    return re.sub(r"^(Value error, )+", "", err["msg"])


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {error_message(err)}" if where else error_message(err)


@dataclasses.dataclass(frozen=True)
class ParamsOrigin:
    """Where the settings of a run come from: a params file (None: the defaults) and ``--set``
    overrides. Errors about a setting name the one that set it."""

    path: str | Path | None = None
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)

    def of(self, key: str) -> str:
        """``--set KEY=VALUE`` when an override set ``key`` (or a part of it or above it),
        else the params file."""
        for dotted, value in self.overrides.items():
            if key == dotted or key.startswith(f"{dotted}.") or dotted.startswith(f"{key}."):
                return f"--set {dotted}={override_text(value)}"
        return str(self.path) if self.path is not None else "<defaults>"


def override_text(value: Any) -> str:
    """An override's value as it would be typed after ``--set KEY=``."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10 ** 6).strip().removesuffix(
        "...").strip()


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items -> {dotted key: YAML value}; a bad item is a one-line error."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise DefectflowError(f"--set expects KEY=VALUE with a dotted KEY, got {item!r}")
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise DefectflowError(f"value is not valid YAML ({str(exc).splitlines()[0]})",
                                  f"--set {item}") from None
    return overrides


def load_params(path: str | Path | None = None, overrides: dict[str, Any] | None = None
                ) -> PipelineParams:
    """Read and validate a params YAML (defaults when ``path`` is None); errors name the file,
    or the ``--set`` override that caused them."""
    origin = ParamsOrigin(path, dict(overrides or {}))
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise DefectflowError("params file not found", path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise DefectflowError(f"not valid YAML ({str(exc).splitlines()[0]})", path) from None
        if not isinstance(data, dict):
            raise DefectflowError("expected a mapping of parameters at the top level", path)
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for depth, key in enumerate(parents):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                above = ".".join(parents[:depth + 1])
                raise DefectflowError(f"{above} is not a mapping of settings",
                                      origin.of(dotted))
        node[leaf] = value
    try:
        return PipelineParams.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        err = errors[0]
        where = ".".join(str(p) for p in err["loc"])
        message = error_message(err)
        if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            message = "unknown key"
        raise DefectflowError(f"{where}: {message}", origin.of(where)) from None


def flatten(params: PipelineParams) -> dict[str, str]:
    """Dotted keys → string values, for MLflow params (one value per resolved setting)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), sub)
        else:
            out[prefix] = str(value)

    walk("", params.model_dump(mode="json"))
    out["tracking.uri"] = redacted_uri(params.tracking.resolved_uri())  # the URI actually used
    return out


def redacted_uri(uri: str) -> str:
    """``uri`` without its password (a PostgreSQL URI may carry one), for logs and errors."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", uri)
