"""The encoder CutPaste trained in this run as a member of the heterogeneous feature
ensemble (``features.sources: [..., {backbone: cutpaste, layers: [...]}]``).

The encoder is trained by the pipeline's train step with ``methods.cutpaste``'s settings
(CutPaste's defaults when that method is not listed), before the features step. Its weights
are written once to one file (``ENCODER_FILE``: the architecture's name, the CutPaste
model's key and the encoder's state), which travels in the combined feature store and in
every model trained on it; the member's store key holds that model key, so a changed
CutPaste setting re-extracts this member only. Its layers are the encoder's stages
(``cutpaste_net.encoder_stages``): ``stem``, ``blocks.0``-``blocks.6``, ``head`` for
EfficientNet-Lite0, ``stem``, ``layer1``-``layer4`` for the ResNets.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import DefectflowError
from ..features import TrainedNetwork
from ..normalization import IMAGENET_MEAN, IMAGENET_STD
from .cutpaste import CutPaste, CutPasteParams
from .cutpaste_net import Encoder, encoder_stages

#: The ``backbone`` of a feature source that reads CutPaste's trained encoder.
ENCODER_SOURCE = CutPaste.name
#: The encoder's file, in the combined store and in the folders of the models trained on it.
ENCODER_FILE = "cutpaste_encoder.pt"


def encoder_params(features, methods: dict) -> CutPasteParams | None:
    """The CutPaste settings whose encoder ``features`` read (``methods``' own, else the
    defaults); None when no source reads it."""
    if not any(s.backbone == ENCODER_SOURCE for s in features.sources):
        return None
    return methods.get(CutPaste.name) or CutPasteParams()


def encoder_layers(params: CutPasteParams) -> list[str]:
    """The layers a source may cut the encoder after, shallow to deep."""
    return encoder_stages(params.encoder)


def export_encoder(model_dir: str | Path, key: str, path: str | Path) -> Path:
    """Write the encoder of the CutPaste model in ``model_dir`` (made under ``key``) to
    ``path``."""
    detector = CutPaste.load(model_dir)
    torch.save({"encoder": detector.params.encoder, "key": key,
                "state": detector.network.encoder.state_dict()}, path)
    return Path(path)


def _read(path: str | Path) -> dict:
    try:  # weights_only: a model folder's file must never run code when read
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a bad file
        raise DefectflowError(f"cannot read the CutPaste encoder ({error})", path) from None


def _backbone(encoder: Encoder, name: str, layers: Sequence[str]):
    from ..backbones import Backbone

    stages = list(zip(encoder.stage_names, encoder.stages))
    # Stops after the deepest layer asked for, like ``load_backbone``.
    deepest = max(encoder.stage_names.index(layer) for layer in layers)
    # The ImageNet statistics CutPaste's encoders were trained with (informative only).
    return Backbone(name, stages[:deepest + 1], layers, IMAGENET_MEAN, IMAGENET_STD)


def load_encoder(saved: dict, path: str | Path, layers: Sequence[str], device: str = "cpu"):
    """The encoder read from the file ``path`` (``saved``) as a frozen ``Backbone`` returning
    ``layers``."""
    unknown = [layer for layer in layers if layer not in encoder_stages(saved["encoder"])]
    if unknown:
        raise DefectflowError(f"unknown layer(s) {unknown} for the CutPaste encoder "
                              f"{saved['encoder']!r}", path)
    # Architecture only: the saved state replaces every weight.
    encoder = Encoder(saved["encoder"], pretrained=False)
    encoder.load_state_dict(saved["state"])
    return _backbone(encoder.to(device), f"{ENCODER_SOURCE}:{saved['encoder']}", layers)


def encoder_network(path: str | Path) -> TrainedNetwork:
    """The encoder file as the stand-in for a backbone in ``features.extract_features``; the
    file is read once, for its key and, when features are extracted, its weights."""
    saved = _read(path)
    return TrainedNetwork(identity=f"{ENCODER_SOURCE}:{saved['key']}",
                          load=lambda layers, device: load_encoder(saved, path, layers, device))


def pretrained_channels(params: CutPasteParams, layers: Sequence[str]) -> int:
    """Channels the encoder's ``layers`` give, measured on the ImageNet encoder CutPaste
    starts from (loading it also checks that its weights are on this machine)."""
    backbone = _backbone(Encoder(params.encoder, pretrained=True), params.encoder, layers)
    return sum(backbone.layer_channels.values())
