"""The one detector interface (scikit-learn style) and what a detector is given.

Every method is used the same way: ``Detector(params).fit(train) -> self``,
``score(batch) -> (image_scores, anomaly_maps)``, ``save(dir)``, ``load(dir)``.
The flow, the fusion and the evaluation never special-case a method.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from .. import cores
from ..errors import DefectflowError
from ..features import FeatureStoreRef, iter_input_batches
from ..patches import iter_patch_pixels


@dataclass
class PatchSet:
    """Patches handed to a detector: their table rows, and where their features and pixels are.

    ``positions`` are the rows of these patches inside ``store`` (one store
    holds a whole category; a PatchSet selects the train or the test part).
    Feature-based methods read ``feature_chunks``; methods that train their
    own network read ``input_batches``.
    """

    table: pd.DataFrame
    store: FeatureStoreRef | None
    positions: np.ndarray
    paths: dict[str, str]
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: str = "cpu"     # where methods that train a network run ("cpu" or "cuda")
    denoise: dict | None = None  # preprocessing applied to every image before cropping

    @property
    def labels(self) -> np.ndarray:
        """Patch labels (0 good, 1 defective); training sets are all 0 unless a method
        asks for labelled defects (``Detector.needs_labelled_defects``)."""
        return self.table["label"].to_numpy()

    def __len__(self) -> int:
        return len(self.table)

    def subset(self, part: slice) -> "PatchSet":
        """A contiguous part of this set (the scoring step scores in bounded pieces)."""
        return dataclasses.replace(self, table=self.table.iloc[part].reset_index(drop=True),
                                   positions=self.positions[part])

    def feature_chunks(self, layers, chunk_size: int = 256
                       ) -> Iterator[tuple[slice, dict[str, np.ndarray]]]:
        """(slice into this set, {layer: float32 (n, C, h, w)}) in bounded-memory chunks."""
        if self.store is None:
            raise ValueError("this PatchSet has no feature store")
        arrays = {layer: self.store.maps(layer) for layer in layers}
        for start in range(0, len(self.positions), chunk_size):
            cores.follow()  # the current share of the cores, when steps run side by side
            part = slice(start, min(start + chunk_size, len(self.positions)))
            wanted = self.positions[part]
            if len(wanted) and np.array_equal(wanted, np.arange(wanted[0],
                                                                wanted[0] + len(wanted))):
                # Consecutive rows in order (whole images, scored in their store's order):
                # one slice of the store, converted once, instead of a gather and a reorder.
                yield part, {layer: a[wanted[0]:wanted[0] + len(wanted)].astype(np.float32)
                             for layer, a in arrays.items()}
                continue
            rows = np.sort(wanted)
            order = np.argsort(np.argsort(wanted))
            yield part, {layer: np.asarray(a[rows], dtype=np.float32)[order]
                         for layer, a in arrays.items()}

    def input_batches(self, batch_size: int = 32) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions in this set, normalized float32 (B, 3, S, S) inputs)."""
        for batch in iter_input_batches(self.table, self.paths, self.input_size, self.mean,
                                        self.std, batch_size, self.denoise):
            cores.follow()
            yield batch

    def pixel_crops(self) -> Iterator[tuple[int, np.ndarray]]:
        """(position in this set, RGB uint8 crop before resizing and normalization), for
        methods that augment raw pixels."""
        yield from iter_patch_pixels(self.table, self.paths, self.denoise)


class Detector:
    """Base class: parameters as a dataclass, saved as JSON beside the fitted state.

    ``needs_labelled_defects``: the method trains on good images plus a few
    labelled defective ones; the pipeline then draws ``params.n_defective``
    defective test images (seeded) into its training set and never scores
    them in its evaluation. ``reads_features``: ``score`` reads backbone
    features (``PatchSet.feature_chunks``), so new images need a feature
    store; the others run their own network on ``PatchSet.input_batches``.
    ``history`` holds per-epoch training curves
    (``{"train_loss": [...], ...}``), saved as ``history.json`` and logged to
    MLflow as metrics by step.
    """

    name: ClassVar[str]
    Params: ClassVar[type]
    needs_labelled_defects: ClassVar[bool] = False
    reads_features: ClassVar[bool] = False
    # Why ``torch_head`` is missing (None where it exists): the one-line reason an export
    # of this detector (tasks/serving/onnx_export.py) is refused with.
    export_refusal: ClassVar[str | None] = "its scoring has no torch form to export"
    # Export formats this detector is refused in although it has a torch form: {format: why}.
    format_refusals: ClassVar[dict[str, str]] = {}
    # Parameters added after models were saved, with the value such older models were fitted
    # with (their detector.json lacks the key; a new default must not change how they score).
    saved_before: ClassVar[dict[str, Any]] = {}

    def __init__(self, params: Any = None):
        self.params = params if params is not None else self.Params()
        self.history: dict[str, list[float]] = {}

    def fit(self, train: PatchSet) -> "Detector":
        raise NotImplementedError

    def score(self, batch: PatchSet) -> tuple[np.ndarray, np.ndarray]:
        """Image (patch) scores (n,) and anomaly maps (n, S, S), float32."""
        raise NotImplementedError

    def torch_head(self, input_size: int):
        """The scoring as a torch module (``methods.torch_heads``): backbone feature maps
        (list in the detector's layer order) -> (image scores (B,), maps (B, S, S))."""
        raise DefectflowError(f"a {self.name} detector cannot be exported: {self.export_refusal}")

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "detector.json").write_text(json.dumps(
            {"method": self.name, "params": dataclasses.asdict(self.params)}, indent=1))
        if self.history:
            (directory / "history.json").write_text(json.dumps(self.history))
        self._save_state(directory)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "Detector":
        directory = Path(directory)
        meta = json.loads((directory / "detector.json").read_text())
        detector = cls(cls.Params(**{**cls.saved_before, **meta["params"]}))
        if (directory / "history.json").is_file():
            detector.history = json.loads((directory / "history.json").read_text())
        detector._load_state(directory)
        return detector

    def _save_state(self, directory: Path) -> None:
        raise NotImplementedError

    def _load_state(self, directory: Path) -> None:
        raise NotImplementedError


class FeatureDetector(Detector):
    """A detector on the feature store: ``fit`` and ``score`` read backbone features
    (``PatchSet.feature_chunks``), so scoring new images extracts them first."""

    reads_features: ClassVar[bool] = True
    # Their scoring is torch over feature maps (``torch_head``), so they export unless a
    # detector says why not.
    export_refusal: ClassVar[str | None] = None
