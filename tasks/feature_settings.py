"""The feature settings: one frozen object from the params file to extraction and serving.

A module of its own, with no heavy import: params validation, the CLI and tracking use it
without loading torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: ``features.device``: auto (a GPU when torch sees one), cpu, cuda or cuda:N.
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
#: ``features.combine``: the thesis's global (concatenate, then PCA) or individual (PCA per
#: network, then concatenate) transformation block.
COMBINE_BLOCKS = ("global", "individual")
#: The one layer a combined (heterogeneous) feature store holds; the detectors read it.
COMBINED_LAYER = "combined"


@dataclass(frozen=True)
class FeatureSource:
    """One network of a heterogeneous feature ensemble: ``features.sources[i]``."""

    __pydantic_config__ = {"extra": "forbid"}

    backbone: str
    layers: tuple[str, ...]
    input_size: int | None = None  # None: ``features.input_size``

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise ValueError(f"{self.backbone}: at least one layer is needed")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"{self.backbone}: layers {list(self.layers)} repeat a name")
        if self.input_size is not None and not 32 <= self.input_size <= 2048:
            raise ValueError(f"{self.backbone}: input_size must be from 32 to 2048, "
                             f"got {self.input_size}")


@dataclass(frozen=True)
class FeatureSettings:
    """How patches become backbone features: ``features`` in params, built once when the
    params are validated, and the same object in extraction, in scoring new images and in a
    registered model's scoring settings."""

    # Validated by pydantic as ``PipelineParams.features``: unknown keys are errors there too.
    __pydantic_config__ = {"extra": "forbid"}

    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] = ("blocks.2", "blocks.4")
    input_size: int = 224
    batch_size: int = 8  # 8 was fastest on a 2-core CPU
    device: str = "auto"
    # A heterogeneous feature ensemble (thesis 004, 2.1): when ``sources`` is given, the
    # maps of each network (``backbone`` and ``layers`` above are then unused) are brought to
    # the first source's first layer's grid and combined by the ``combine`` block into
    # ``channels`` PCA maps (per network for "individual"; None: all channels, no PCA).
    # Absent, the settings are exactly the single-backbone ones (same cache keys).
    sources: tuple[FeatureSource, ...] = ()
    combine: str = "global"
    channels: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "sources", tuple(
            s if isinstance(s, FeatureSource) else FeatureSource(**s) for s in self.sources))
        if self.combine not in COMBINE_BLOCKS:
            raise ValueError(f"combine must be one of {list(COMBINE_BLOCKS)}, "
                             f"got {self.combine!r}")
        if self.channels is not None and self.channels < 1:
            raise ValueError(f"channels must be >= 1 (or null: all), got {self.channels}")
        if not self.layers:
            raise ValueError("layers: at least one layer is needed")
        if not 32 <= self.input_size <= 2048:
            raise ValueError(f"input_size must be from 32 to 2048, got {self.input_size}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not isinstance(self.device, str) or not DEVICE_PATTERN.fullmatch(self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    @property
    def combined(self) -> bool:
        """Whether the features come from several networks (``sources``)."""
        return bool(self.sources)

    @property
    def detector_layers(self) -> tuple[str, ...]:
        """The layers the detectors read from the feature store."""
        return (COMBINED_LAYER,) if self.sources else self.layers

    def source_settings(self, source: FeatureSource) -> "FeatureSettings":
        """The single-backbone settings of one source: its own content-addressed store."""
        return FeatureSettings(backbone=source.backbone, layers=source.layers,
                               input_size=source.input_size or self.input_size,
                               batch_size=self.batch_size, device=self.device)

    @property
    def label(self) -> str:
        """The backbone, or the ensemble's networks and block, for run tags and titles."""
        if not self.sources:
            return self.backbone
        networks = "+".join(s.backbone.replace("efficientnet_", "") for s in self.sources)
        return f"{networks} {self.combine} {self.channels or 'all'}"
