"""The feature settings: one frozen object from the params file to extraction and serving.

A module of its own, with no heavy import: params validation, the CLI and tracking use it
without loading torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: ``features.device``: auto (a GPU when torch sees one), cpu, cuda or cuda:N.
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


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

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise ValueError("layers: at least one layer is needed")
        if not 32 <= self.input_size <= 2048:
            raise ValueError(f"input_size must be from 32 to 2048, got {self.input_size}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not isinstance(self.device, str) or not DEVICE_PATTERN.fullmatch(self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
