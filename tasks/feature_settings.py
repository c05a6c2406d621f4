"""The feature settings: one frozen object from the params file to extraction and serving.

A module of its own, with no heavy import: params validation, the CLI and tracking use it
without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass


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
